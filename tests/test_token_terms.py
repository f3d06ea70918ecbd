"""The per-token reducer API (ptlight.engine.token_terms) and the objectives that use it in the
preference method: chunked full-vocabulary terms equal a direct full-logits computation
(values and gradients, packed and plain), and full-vocabulary objectives refuse reference
modes that cannot serve them before any weights load."""

import copy
import math
import tomllib
from importlib.metadata import EntryPoint

import pytest
import torch
from omegaconf import OmegaConf

from helpers import REPO, TINY, tiny_model_cfg
from ptlight.data.module import pad_rows
from ptlight.engine.logps import completion_index
from ptlight.engine.packing import pack_checked
from ptlight.engine.token_terms import completion_terms, reference_side
from ptlight.errors import ConfigError
from ptlight.methods.preference import PreferenceMethod
from ptlight.model.backbone import build_policy, load_tokenizer
from ptlight.model.reference import FrozenCopy
from ptlight.objectives import available_objectives, get_objective
from ptlight.objectives.sparsepo import SparsePO
from ptlight.objectives.tdpo import TDPO
from ptlight.train import _check_method, train_stage

ALL = ("logp", "ref_logp", "entropy", "ref_kl", "hidden", "ref_hidden")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    policy = build_policy(cfg, load_tokenizer(cfg))
    reference = copy.deepcopy(policy).eval()
    with torch.no_grad():  # a reference that differs from the policy: KL > 0
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


def _batch(seed=0):
    """Two pairs (chosen block, rejected block) over random prompts, right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(5, 300, (n,), generator=g).tolist()  # noqa: E731
    prompts = [ids(5), ids(8)]
    lens = [[4, 2], [6, 3]]
    seqs = [(p, ids(lens[j][i])) for j in range(2) for i, p in enumerate(prompts)]
    batch = pad_rows(seqs, 0)
    batch["index"] = torch.arange(2)
    return batch


def _direct(policy, reference, batch):
    """Textbook terms from the full ``[R, T, V]`` logits of both models."""
    args = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["loss_mask"][:, 1:].bool()
    logp = torch.log_softmax(policy(**args).logits[:, :-1].float(), -1)[mask]  # (M, V)
    with torch.no_grad():
        ref = torch.log_softmax(reference(**args).logits[:, :-1].float(), -1)[mask]
    targets = batch["input_ids"][:, 1:][mask][:, None]
    return {
        "logps": logp.gather(-1, targets)[:, 0],
        "ref_logps": ref.gather(-1, targets)[:, 0],
        "entropy": -(logp.exp() * logp).sum(-1),
        "ref_kl": (ref.exp() * (ref - logp)).sum(-1),
    }


def _terms(policy, reference, batch, chunk_size, pack, collated=False):
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    ahead = {}
    if collated:  # what the collate builds on the host: the completion index, the layout
        ahead["index"] = completion_index(batch["loss_mask"])
        if pack:
            ahead["packed"] = pack_checked(*args, pack, 2048, multiple_of=16)
    with torch.no_grad():
        side = reference_side(reference, *args, pack=pack, **ahead)
    return completion_terms(policy, *args, ALL, k=2, reference=side, chunk_size=chunk_size,
                            pack=pack, **ahead)


@pytest.mark.parametrize("chunk_size,pack,collated", [
    (1, None, False), (3, None, False), (4096, None, False), (3, 2, False),
    (3, None, True), (3, 2, True)])
def test_chunked_terms_equal_full_logits_values_and_gradients(models, chunk_size, pack,
                                                              collated):
    """The per-token terms equal the textbook ones from full logits, with their gradients:
    chunked, packed in the step, and from what the collate builds (the completion index of
    padded rows, the packed layout in widths of 16), which the step uses on a GPU."""
    policy, reference = models
    batch = _batch()
    weights = {"logps": 1.0, "entropy": 0.3, "ref_kl": -0.7}  # any mix: gradients of each
    policy.zero_grad()
    want = _direct(policy, reference, batch)
    sum(w * want[n].sum() for n, w in weights.items()).backward()
    want_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    got, diagnostics = _terms(policy, reference, batch, chunk_size, pack, collated)
    sum(w * getattr(got, n).sum() for n, w in weights.items()).backward()
    for name in want:
        torch.testing.assert_close(getattr(got, name), want[name].detach(), atol=2e-5, rtol=0)
    assert got.ref_kl.min() > 0  # the two models differ
    for name, g in want_grads.items():
        torch.testing.assert_close(policy.get_parameter(name).grad, g, atol=2e-5, rtol=1e-4)
    policy.zero_grad()
    assert got.hidden.shape == (got.logps.numel(), 64) and got.hidden.requires_grad
    assert got.ref_hidden.shape == got.hidden.shape and not got.ref_hidden.requires_grad
    assert diagnostics["num_tokens"].item() == 15
    assert diagnostics["entropy"].item() == pytest.approx(want["entropy"].mean().item(), abs=1e-5)


def test_undeclared_terms_are_none_and_ref_terms_need_a_reference_side(models):
    policy, _ = models
    batch = _batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with torch.no_grad():
        terms, _ = completion_terms(policy, *args, ("logp",), k=2)
    assert terms.entropy is None and terms.ref_kl is None and terms.hidden is None
    assert terms.columns(terms.logps).shape == (2, 2)
    with pytest.raises(ValueError, match="need a reference side"):
        completion_terms(policy, *args, ("logp", "ref_kl"), k=2)
    with pytest.raises(ValueError, match="unknown token terms"):
        completion_terms(policy, *args, ("logits",), k=2)


@pytest.mark.parametrize("objective", [TDPO(), SparsePO(), SparsePO(mask="activation"),
                                       SparsePO(shared_masks=False)],
                         ids=["tdpo", "sparsepo-learnable", "sparsepo-activation",
                              "sparsepo-independent"])
def test_preference_step_starts_at_ln2_and_trains_policy_and_masks(models, objective):
    policy, _ = models
    policy = copy.deepcopy(policy).train()
    objective = copy.deepcopy(objective)
    method = PreferenceMethod(policy, objective, OmegaConf.create({}),
                              reference=FrozenCopy(policy), pack=True)
    out, diagnostics = method.forward_batch(_batch(), "train")
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    assert out.metrics["kl/chosen"].item() == pytest.approx(0.0, abs=1e-5)
    assert diagnostics["num_tokens"].item() == 15
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    if isinstance(objective, SparsePO) and objective.mask == "learnable":
        assert method.objective.mask_u.bias.grad is not None
        names = [n for n, _ in method.named_parameters()]
        assert "objective.mask_u.weight" in names  # the optimiser and checkpoints see it


def _cfg(compose_cfg, *overrides):
    return compose_cfg("method=sparsepo", "eval.before=false", *TINY, *overrides)


@pytest.mark.parametrize("mode,why", [("precompute", "stores only each sequence's summed"),
                                      ("none", "has no reference model")])
@pytest.mark.parametrize("objective", [SparsePO(), TDPO()], ids=["sparsepo", "tdpo"])
def test_full_vocab_objectives_refuse_reference_modes_that_cannot_serve_them(
        compose_cfg, mode, why, objective):
    cfg = _cfg(compose_cfg, f"method.reference={mode}")
    with pytest.raises(ConfigError, match=rf"method\.reference={mode} {why}.*use "
                                          r"method\.reference=copy"):
        _check_method(cfg, PreferenceMethod, objective)
    assert _check_method(_cfg(compose_cfg), PreferenceMethod, objective) == "copy"


def _pyproject_entry_points(names):
    table = tomllib.loads((REPO / "pyproject.toml").read_text())
    group = table["project"]["entry-points"]["ptlight.objectives"]
    return [EntryPoint(n, group[n], "ptlight.objectives") for n in names]


def test_pyproject_registers_sparsepo_and_tdpo_with_configs():
    sparsepo, tdpo = (ep.load() for ep in _pyproject_entry_points(["sparsepo", "tdpo"]))
    assert sparsepo is SparsePO and tdpo is TDPO
    for name in ("sparsepo", "tdpo"):
        assert (REPO / "conf" / "method" / f"{name}.yaml").exists()


@pytest.fixture
def with_branch_entry_points(monkeypatch):
    """The registry sees this checkout's sparsepo/tdpo entry points even where the installed
    metadata predates them (an editable install of another checkout)."""
    import ptlight.registry

    real = ptlight.registry.entry_points
    extra = _pyproject_entry_points(["sparsepo", "tdpo"])
    monkeypatch.setattr(ptlight.registry, "entry_points",
                        lambda group: [*real(group=group),
                                       *(extra if group == "ptlight.objectives" else [])])


@pytest.mark.parametrize("method", ["sparsepo", "tdpo"])
def test_cli_refuses_precompute_before_weights_load(compose_cfg, tmp_path, monkeypatch,
                                                    with_branch_entry_points, method):
    import ptlight.train

    for name in ("load_tokenizer", "build_policy"):
        monkeypatch.setattr(ptlight.train, name, lambda *a, _n=name: pytest.fail(f"{_n} ran"))
    cfg = compose_cfg(f"method={method}", "method.reference=precompute", "eval.before=false",
                      *TINY)
    with pytest.raises(ConfigError, match=r"method\.reference=precompute stores only"):
        train_stage(cfg, tmp_path / "run")


@pytest.mark.skipif("sparsepo" not in available_objectives(),
                    reason="entry points come from the installed metadata: passes once this "
                           "branch is installed (pip install -e .)")
def test_installed_registry_serves_sparsepo_and_tdpo():
    assert get_objective("sparsepo") is SparsePO and get_objective("tdpo") is TDPO
