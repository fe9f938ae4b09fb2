"""Worlds the GPO game is played in: the synthetic red-teaming world (offline default) and real-data
seed prompt loaders. See alignjax/worlds/synthetic.py for the API."""

from alignjax.worlds.base import Player, Players, World
from alignjax.worlds.synthetic import SPLITS, SyntheticWorld, WorldConfig

__all__ = ["SPLITS", "Player", "Players", "SyntheticWorld", "World", "WorldConfig"]
