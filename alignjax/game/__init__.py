"""The GPO game: state, one step (defend / attack stages), the stage schedule, the chunked loop.

    from alignjax.game import GameState, GameConfig, GameSpec, make_play_step, run_loop, LoopConfig

The experiment runner (YAML `runner: experiment`) is `alignjax.experiment`, above the settings.
"""

from alignjax.game.loop import LoopConfig, read_metrics, run_loop
from alignjax.game.schedule import ATTACK, BOTH, DEFEND, ScheduleConfig, stage_at
from alignjax.game.state import GameState, init_game_state
from alignjax.game.step import (
    Episode,
    GameConfig,
    GameConsts,
    GameSpec,
    draw_batch,
    make_game_step,
    make_play_step,
    play,
)

__all__ = [
    "ATTACK",
    "BOTH",
    "DEFEND",
    "Episode",
    "GameConfig",
    "GameConsts",
    "GameSpec",
    "GameState",
    "LoopConfig",
    "ScheduleConfig",
    "draw_batch",
    "init_game_state",
    "make_game_step",
    "make_play_step",
    "play",
    "read_metrics",
    "run_loop",
    "stage_at",
]
