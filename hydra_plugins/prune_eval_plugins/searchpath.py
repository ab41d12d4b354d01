"""Puts the repository root on Hydra's search path so `launch/` is a config group (launch=slurm)."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from prune_eval.config import REPO_ROOT


class PruneEvalSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="prune_eval", path=f"file://{REPO_ROOT}")
