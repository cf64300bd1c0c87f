"""connect()'s defaults from the environment launchers set (TF_CONFIG, torchrun)."""

from __future__ import annotations

import json

import pytest

from pserver.clients.client import launcher_settings


def test_nothing_set_means_no_address_and_worker_0_of_1() -> None:
    assert launcher_settings({}) == (None, 0, 1)


def test_pserver_address_wins_over_tf_config() -> None:
    tf = json.dumps({"cluster": {"ps": ["h:1"], "worker": ["a:1", "b:1"]},
                     "task": {"type": "worker", "index": 1}})
    assert launcher_settings({"PSERVER_ADDRESS": "tcp://x:7", "TF_CONFIG": tf}) == (
        "tcp://x:7", 1, 2)


def test_tf_config_with_a_chief_counts_it_as_worker_0() -> None:
    cluster = {"ps": ["ps0:7000"], "chief": ["c:1"], "worker": ["a:1", "b:1"]}
    for task, want in ((("chief", 0), 0), (("worker", 0), 1), (("worker", 1), 2)):
        tf = json.dumps({"cluster": cluster, "task": {"type": task[0], "index": task[1]}})
        assert launcher_settings({"TF_CONFIG": tf}) == ("tcp://ps0:7000", want, 3)


def test_torchrun_rank_and_world_size() -> None:
    assert launcher_settings({"RANK": "3", "WORLD_SIZE": "4"}) == (None, 3, 4)


def test_a_tf_config_that_is_not_json_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="TF_CONFIG"):
        launcher_settings({"TF_CONFIG": "{not json"})
