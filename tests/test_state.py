"""A client's persistent state never goes back in silence (fedsim.state): a client that
finds its state older than a round it wrote it in stops the run with one line naming the
client and the rounds, while a resume from a checkpoint, a round run again and a client
seen for the first time are no regression."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.cli import main
from fedsim.errors import UserError
from fedsim.runner import run_experiment
from fedsim.state import ClientStateStore, WrittenRounds

from .conftest import QUICKSTART, tiny_experiment, tiny_overrides

STATEFUL = ["strategy.name=fedbn", "model.name=resnet", "model.width=4"]  # FedBN keeps BatchNorm in client state


def _state(value: float) -> dict[str, np.ndarray]:
    return {"bn": np.full(2, value, dtype=np.float32)}


def test_a_state_file_lost_after_it_was_written_is_a_one_line_error(tmp_path):
    store = ClientStateStore(tmp_path / "client_state")
    store.save(0, 1, _state(1))
    store.save(0, 3, _state(3))
    assert store.newest(0, 3)[0] == 3
    (tmp_path / "client_state/0/r000003.npz").unlink()  # round 3's update is lost
    message = (
        "client 0's state went back: it wrote its state in round 3, but as of round 3 its state is from round 1; "
        "an update was lost, so the run stops"
    )
    with pytest.raises(UserError, match=f"^{message}$"):
        store.load(0, 3)
    with pytest.raises(UserError, match="as of round 4 its state is from round 1"):
        ClientStateStore(tmp_path / "client_state").load(0, 4)  # every store on the folder knows
    assert store.load(0, 2)["bn"][0] == 1, "round 3 run again reads round 1's state, as it should"
    assert store.load(1, 3) == {}, "a client never seen writing is not checked"


def test_a_run_going_back_to_a_checkpoint_is_no_regression(tmp_path):
    store = ClientStateStore(tmp_path / "client_state")
    store.save(0, 2, _state(2))
    store.save(0, 4, _state(4))
    ClientStateStore(tmp_path / "client_state").discard_after(2)  # a resume from round 2's checkpoint
    assert store.newest(0, 4)[0] == 2
    ClientStateStore(tmp_path / "client_state").discard_after(0)  # a new run in the folder
    assert store.newest(0, 4) == (0, {})


def test_written_rounds_check_only_reads_as_of_the_last_write_or_later():
    written = WrittenRounds()
    written.wrote("a", 3)
    written.check("a", "a", 3, 5)
    written.check("a", "a", 1, 2)  # as of round 2: round 3's write is not due yet
    written.check("b", "b", None, 9)  # never seen writing
    with pytest.raises(
        UserError, match=r"^client a's state went back: .* round 3, but as of round 3 its state is none"
    ):
        written.check("a", "a", None, 3)
    written.forget_after(2)
    written.check("a", "a", None, 3)


def test_a_lost_client_state_update_stops_a_fedsim_run_with_one_line(tmp_path, monkeypatch, capsys):
    original = ClientStateStore.save

    def losing_round_2_of_client_0(self, client, server_round, state):
        original(self, client, server_round, state)
        if (client, server_round) == (0, 2):
            (self.root / "0" / "r000002.npz").unlink()

    monkeypatch.setattr(ClientStateStore, "save", losing_round_2_of_client_0)
    args = ["run", str(QUICKSTART), "--quiet", "--out", str(tmp_path / "run")]
    for override in tiny_overrides(*STATEFUL, "rounds=3", "evaluate_every=1"):
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        "client 0's state went back: it wrote its state in round 2, but as of round 2 its state is from round 1; "
        "an update was lost, so the run stops"
    ), err


def test_a_new_run_in_the_same_folder_and_process_is_no_regression(tmp_path):
    """This process remembers what the first run's clients wrote; the second run, in the
    same folder, samples one client a round, and must not take the first run's writes for
    its own."""
    run_experiment(tiny_experiment(*STATEFUL, "rounds=3"), tmp_path / "run")
    second = tiny_experiment(*STATEFUL, "rounds=3", "strategy.fraction_train=0.25", "evaluate_every=1")
    assert run_experiment(second, tmp_path / "run", overwrite=True).summary["rounds_completed"] == 3
