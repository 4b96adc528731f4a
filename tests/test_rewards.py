"""Rewards from checks: exact answers, commands (verdicts, a timeout that turns a hang into a failure, no
network: a listener on 127.0.0.1 that the scored program cannot reach), Python callables, and their
weighted combination."""

import socket
import sys
import threading
import time

import pytest
import torch

from gemmakit.train import rewards
from gemmakit.train.rewards import CommandReward, Rewards, exact_answer

PY = sys.executable


@pytest.mark.parametrize("reply, answer, want", [
    (" 58\n", 58, 1.0), ("58", "58", 1.0), (" 58.0 apples", 58, 1.0), ("1,234", 1234, 1.0), ("-3", -3, 1.0),
    (" 57\n58", 58, 0.0), ("no number", 58, 0.0), ("Let me think #### 42", 42, 1.0), (" 5 8", 58, 0.0),
    (" Paris\nok", "Paris", 1.0), ("paris", "Paris", 0.0),
])
def test_exact_answer(reply, answer, want):
    assert exact_answer({"answer": answer}, reply) == want


def test_exact_answer_needs_an_answer():
    with pytest.raises(ValueError, match='"answer"'):
        exact_answer({"prompt": "1 + 1 = "}, "2")


def test_command_scores_by_exit_status_or_its_last_number_and_sees_the_record():
    ok = CommandReward([PY, "-c", "import sys, json, os; r = json.loads(os.environ['GEMMAKIT_RECORD']); "
                                  "sys.exit(0 if sys.stdin.read().strip() == str(r['answer']) else 3)"])
    assert ok([{"answer": 4}, {"answer": 5}], ["4", "4"]) == [1.0, 0.0]
    graded = CommandReward([PY, "-c", "import sys; print('log line'); print(len(sys.stdin.read()) / 10)"])
    assert graded([{}, {}], ["abc", ""]) == [0.3, 0.0]
    assert CommandReward(["/nonexistent/program"])([{}], ["x"]) == [0.0]  # cannot start: a failure


def test_a_hanging_reply_scores_as_a_failure_after_the_timeout():
    """A command that runs the reply as a program: a reply that loops forever, or that starts a child and
    sleeps, is killed (with its child: the whole process group) at the timeout and scores 0."""
    run = CommandReward([PY, "-c", "import sys; exec(sys.stdin.read())"], timeout=1.0)
    sleeper = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               "time.sleep(60)")
    start = time.monotonic()
    assert run([{}] * 3, ["print(1)", "while True: pass", sleeper]) == [1.0, 0.0, 0.0]
    assert time.monotonic() - start < 10


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 (never an outside address) that counts the connections it accepts."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def test_commands_run_without_network(listener):
    port, accepted = listener
    if rewards.isolation_prefix() is None:
        pytest.skip("no network namespaces on this machine (CommandReward refuses; tested below)")
    reach = [PY, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3); print(1)"]
    assert CommandReward(reach, timeout=10)([{}], [""]) == [0.0]
    assert accepted == []
    # the same program with the network allowed does reach the listener: the check above can fail
    assert CommandReward(reach, timeout=10, network=True)([{}], [""]) == [1.0]
    assert accepted == [1]


def test_without_network_isolation_commands_are_refused(monkeypatch):
    monkeypatch.setattr(rewards, "isolation_prefix", lambda: None)
    with pytest.raises(ValueError, match="--reward-network"):
        CommandReward([PY, "-c", "print(1)"])
    CommandReward([PY, "-c", "print(1)"], network=True)  # knowingly allowed


def test_python_callable_and_weighted_combination(tmp_path):
    (tmp_path / "check.py").write_text("def short(record, reply):\n    return float(len(reply) <= record['max'])\n")
    _, short = rewards.parse_spec(f"python:{tmp_path / 'check.py'}:short")
    assert short([{"max": 2}, {"max": 2}], ["ab", "abc"]) == [1.0, 0.0]
    combined = rewards.build(["exact", f"python:{tmp_path / 'check.py'}:short"], [1.0, 0.5])
    total, parts = combined([{"answer": 7, "max": 2}, {"answer": 7, "max": 2}], [" 7", " 8 is"])
    assert total.tolist() == [1.5, 0.0] and parts["exact"].tolist() == [1.0, 0.0]
    assert parts["python:short"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("spec, error", [
    ("exactly", "unknown --reward"), ("python:nofunction", "unknown --reward"), ("model:/nonexistent/rm", "no such"),
    ("command:", "unknown --reward"),
])
def test_bad_reward_specs_are_refused_before_anything_runs(spec, error):
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        rewards.build([spec])


def test_weights_must_match_the_rewards():
    with pytest.raises(ValueError, match="2 values for 1 rewards"):
        rewards.build(["exact"], [1.0, 2.0])
    with pytest.raises(ValueError, match="no reward"):
        Rewards([])


def test_rewards_of_the_wrong_length_are_named():
    bad = Rewards([("bad", lambda records, replies: [1.0], 1.0)])
    with pytest.raises(ValueError, match="bad gave 1 scores for 2 replies"):
        bad([{}, {}], ["a", "b"])
    assert isinstance(Rewards([("one", lambda r, y: [1.0] * len(y), 2.0)])([{}], ["a"])[0], torch.Tensor)
