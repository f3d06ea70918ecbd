"""``python -m ptlight.objectives``: list installed objectives with their provenance."""

from ptlight.registry import OBJECTIVES, print_listing


def main() -> None:
    print_listing(OBJECTIVES, lambda cls: {
        "data": cls.data_kind, "reference": "yes" if cls.needs_reference else "no"})


if __name__ == "__main__":
    main()
