"""``python -m ptlight.tasks``: list installed tasks with their provenance."""

from ptlight.registry import TASKS, print_listing


def main() -> None:
    print_listing(TASKS, lambda task: {
        "data shapes": ", ".join(getattr(task, "kinds", ("sft", "pairwise", "listwise",
                                                          "unpaired", "prompt")))})


if __name__ == "__main__":
    main()
