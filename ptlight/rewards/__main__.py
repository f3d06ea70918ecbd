"""``python -m ptlight.rewards``: list installed reward plugins with their provenance."""

from ptlight.registry import REWARDS, print_listing


def main() -> None:
    print_listing(REWARDS)


if __name__ == "__main__":
    main()
