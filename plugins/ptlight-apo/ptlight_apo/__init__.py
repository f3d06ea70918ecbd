"""ptlight-apo: Anchored Preference Optimization objectives as a ptlight plugin."""

from ptlight_apo.apo_zero import APOZero

__all__ = ["APOZero"]
