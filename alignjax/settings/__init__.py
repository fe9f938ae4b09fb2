"""Settings: where a game is played (see settings/base.py for the interface).

    from alignjax.settings import get_setting
    setting = get_setting("synthetic")        # or "real"
"""

from alignjax.settings.base import Built, Setting, unsupported_options
from alignjax.settings.real import RealConfig, RealSetting
from alignjax.settings.synthetic import SyntheticSetting

SETTINGS = {"synthetic": SyntheticSetting, "real": RealSetting}


def get_setting(name: str) -> Setting:
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; choose from {sorted(SETTINGS)}")
    return SETTINGS[name]()


__all__ = ["SETTINGS", "Built", "RealConfig", "RealSetting", "Setting", "SyntheticSetting", "get_setting",
           "unsupported_options"]
