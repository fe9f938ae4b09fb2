"""Worlds the GPO game is played in: the synthetic red-teaming world (offline default) and real-data
seed prompt loaders. See alignjax/worlds/synthetic.py for the API."""

from alignjax.worlds.synthetic import SPLITS, Player, Players, SyntheticWorld, WorldConfig

__all__ = ["SPLITS", "Player", "Players", "SyntheticWorld", "WorldConfig"]
