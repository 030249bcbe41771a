"""The prompt state machine (``comfytrio._prompts``), without a server or a socket.

Each test is a story told in ComfyUI's own messages and answers, with the time given by
hand: what the client hears (websocket messages, what ``/queue`` and ``/history`` answer),
and how each prompt ends because of it.
"""

from __future__ import annotations

from typing import Any

import pytest

from comfytrio import (
    ComfyEvent,
    ExecutionError,
    ExecutionInterruptedError,
    NodeOutput,
    NodeProgress,
    NodesCached,
    NodeStarted,
    PromptFinished,
    PromptResult,
    PromptStarted,
    PromptVanishedError,
    ServerLostError,
    ServerProtocolError,
)
from comfytrio._firewall import Malformed
from comfytrio._prompts import Prompts, Watch

IMAGE = {"images": [{"filename": "out_00001_.png", "subfolder": "", "type": "output"}]}


def submitted(prompts: Prompts, prompt_id: str = "p1", now: float = 0.0) -> Watch:
    """A prompt watched before its ``POST /prompt`` left, and accepted by the server."""
    watch = prompts.watch(prompt_id, now)
    prompts.accepted(watch, now)
    return watch


def hear(prompts: Prompts, now: float, kind: str, **data: Any) -> Watch | None:
    """One websocket message of ``kind`` with ``data``, heard at ``now``."""
    return prompts.message(kind, data, now)


def run_to_the_end(prompts: Prompts, prompt_id: str, now: float) -> Watch | None:
    """The messages of a prompt with one output node, ``9``, that runs and succeeds."""
    hear(prompts, now, "execution_start", prompt_id=prompt_id)
    hear(prompts, now, "executing", prompt_id=prompt_id, node="9")
    hear(prompts, now, "progress", prompt_id=prompt_id, node="9", value=1, max=2)
    hear(prompts, now, "executed", prompt_id=prompt_id, node="9", output=IMAGE)
    hear(prompts, now, "execution_success", prompt_id=prompt_id)
    return hear(prompts, now, "executing", prompt_id=prompt_id, node=None)


def history_entry(*messages: list[Any], outputs: Any = None, status: str = "success") -> Any:
    """A ``/history/{id}`` entry as ComfyUI writes it."""
    return {
        "outputs": outputs or {},
        "status": {"status_str": status, "completed": True, "messages": list(messages)},
    }


# --------------------------------------------------------------------------- from events


def test_a_prompt_settles_from_its_events() -> None:
    events: list[ComfyEvent] = []
    prompts = Prompts("gpu-1", emit=events.append)
    watch = submitted(prompts)

    assert run_to_the_end(prompts, "p1", now=1.0) is None  # nothing to reconcile

    assert watch.done.is_set()
    assert watch.outcome == PromptResult("gpu-1", "p1", {"9": IMAGE})
    assert [type(e) for e in events] == [
        PromptStarted,
        NodeStarted,
        NodeProgress,
        NodeOutput,
        PromptFinished,
    ]
    assert events[-1] == PromptFinished("gpu-1", "p1", "success")


def test_execution_success_alone_does_not_end_a_prompt() -> None:
    # ComfyUI may send execution_success before it writes the history entry: only
    # `executing` with node null means the prompt is over and /history has it.
    prompts = Prompts("gpu-1")
    watch = submitted(prompts)
    hear(prompts, 1.0, "executed", prompt_id="p1", node="9", output=IMAGE)
    hear(prompts, 1.0, "execution_success", prompt_id="p1")
    assert not watch.done.is_set()

    hear(prompts, 1.1, "executing", prompt_id="p1", node=None)
    assert isinstance(watch.outcome, PromptResult)


def test_a_prompts_clock_starts_with_its_first_event_not_its_submission() -> None:
    prompts = Prompts("gpu-1")
    watch = submitted(prompts, now=0.0)
    assert watch.started_at is None  # queued behind others
    assert not watch.running.is_set()

    hear(prompts, 42.0, "execution_start", prompt_id="p1")

    assert watch.started_at == 42.0  # wait()'s timeout counts from here
    assert watch.running.is_set()
    hear(prompts, 50.0, "executing", prompt_id="p1", node="9")
    assert watch.started_at == 42.0


def test_other_clients_prompts_and_messages_of_no_prompt_are_ignored() -> None:
    events: list[ComfyEvent] = []
    prompts = Prompts("gpu-1", emit=events.append)
    watch = submitted(prompts)
    hear(prompts, 1.0, "executing", prompt_id="someone-else", node=None)
    hear(prompts, 1.0, "crystools.monitor", cpu_utilization=3)
    assert events == []
    assert not watch.done.is_set()
    assert not watch.seen


def test_events_are_made_only_while_someone_listens() -> None:
    prompts = Prompts("gpu-1")  # emit None: no subscriber
    watch = submitted(prompts)
    run_to_the_end(prompts, "p1", now=1.0)
    assert isinstance(watch.outcome, PromptResult)


def test_a_cached_prompt_reports_its_cached_nodes() -> None:
    events: list[ComfyEvent] = []
    prompts = Prompts("gpu-1", emit=events.append)
    watch = submitted(prompts)
    hear(prompts, 1.0, "execution_start", prompt_id="p1")
    hear(prompts, 1.0, "execution_cached", prompt_id="p1", nodes=["1", "2", "9"])
    hear(prompts, 1.0, "executed", prompt_id="p1", node="9", output=IMAGE)  # replayed
    hear(prompts, 1.0, "executing", prompt_id="p1", node=None)

    result = watch.outcome
    assert isinstance(result, PromptResult)
    assert result.cached_nodes == ("1", "2", "9")
    assert result.fully_cached
    assert NodesCached("gpu-1", "p1", ("1", "2", "9")) in events


def test_a_node_error_fails_the_prompt_and_keeps_what_was_made_before() -> None:
    prompts = Prompts("gpu-1")
    watch = submitted(prompts)
    hear(prompts, 1.0, "executed", prompt_id="p1", node="9", output=IMAGE)
    hear(
        prompts,
        2.0,
        "execution_error",
        prompt_id="p1",
        node_id="12",
        node_type="KSampler",
        exception_type="torch.OutOfMemoryError",
        exception_message="CUDA out of memory",
        traceback=["line 1", "line 2"],
    )
    hear(prompts, 2.0, "executing", prompt_id="p1", node=None)

    error = watch.outcome
    assert isinstance(error, ExecutionError)
    assert not isinstance(error, ExecutionInterruptedError)
    assert (error.node_id, error.node_type) == ("12", "KSampler")
    assert error.exception_type == "torch.OutOfMemoryError"
    assert error.traceback == ["line 1", "line 2"]
    assert error.node_outputs == {"9": IMAGE}


def test_an_interrupted_prompt_ends_as_interrupted() -> None:
    events: list[ComfyEvent] = []
    prompts = Prompts("gpu-1", emit=events.append)
    watch = submitted(prompts)
    hear(prompts, 1.0, "execution_interrupted", prompt_id="p1", node_id="3", node_type="VAE")
    hear(prompts, 1.0, "executing", prompt_id="p1", node=None)

    assert isinstance(watch.outcome, ExecutionInterruptedError)
    assert watch.outcome.node_id == "3"
    assert events[-1] == PromptFinished("gpu-1", "p1", "interrupted")


def test_a_malformed_message_is_refused_and_ends_its_prompt() -> None:
    prompts = Prompts("gpu-1")
    watch = submitted(prompts)
    with pytest.raises(Malformed):
        hear(prompts, 1.0, "executing", prompt_id="p1", node=True)  # no node id

    assert prompts.malformed(watch, "node is True, not a node id")  # the server may run it
    assert isinstance(watch.outcome, ServerProtocolError)
    assert prompts.take_abandoned() == {"p1"}  # to remove from the server
    assert prompts.abandoned == set()


# --------------------------------------------------------------------------- reconciling


def test_a_prompt_that_ended_while_the_socket_was_down_settles_from_history() -> None:
    prompts = Prompts("gpu-1")
    watch = submitted(prompts)
    hear(prompts, 1.0, "execution_start", prompt_id="p1")
    prompts.disconnected()  # its `executed` may be lost with the socket
    unsure = hear(prompts, 5.0, "executing", prompt_id="p1", node=None)

    assert unsure is watch  # the client asks the server
    assert not watch.done.is_set()
    assert not prompts.queued(watch, running=set(), pending=set(), now=5.1)
    prompts.history(watch, history_entry(outputs={"9": IMAGE}))

    assert watch.outcome == PromptResult("gpu-1", "p1", {"9": IMAGE})


def test_history_says_how_a_prompt_failed_and_which_nodes_were_cached() -> None:
    prompts = Prompts("gpu-1")
    failed, cached = submitted(prompts, "failed"), submitted(prompts, "cached")
    error = {"node_id": "12", "node_type": "KSampler", "exception_message": "boom"}

    prompts.history(failed, history_entry(["execution_error", error], status="error"))
    prompts.history(cached, history_entry(["execution_cached", {"nodes": ["9"]}]))

    assert isinstance(failed.outcome, ExecutionError)
    assert failed.outcome.exception_message == "boom"
    assert isinstance(cached.outcome, PromptResult)
    assert cached.outcome.cached_nodes == ("9",)


def test_a_prompt_still_in_the_queue_is_alive() -> None:
    prompts = Prompts("gpu-1")
    queued, running = submitted(prompts, "queued"), submitted(prompts, "running")

    assert prompts.queued(queued, running={"running"}, pending={"queued"}, now=9.0)
    assert prompts.queued(running, running={"running"}, pending={"queued"}, now=9.0)

    assert queued.started_at is None  # still waiting its turn
    assert running.started_at == 9.0  # its start event was missed: its clock starts now
    assert running.running.is_set()
    assert not queued.done.is_set()
    assert not running.done.is_set()
    assert queued.last_activity == running.last_activity == 9.0  # not silent any more


def test_a_prompt_in_neither_queue_nor_history_has_vanished() -> None:
    events: list[ComfyEvent] = []
    prompts = Prompts("gpu-1", emit=events.append)
    watch = submitted(prompts)

    assert not prompts.queued(watch, running=set(), pending=set(), now=31.0)
    prompts.history(watch, None)  # /history/{id} answered {}

    assert isinstance(watch.outcome, PromptVanishedError)
    assert events == [PromptFinished("gpu-1", "p1", "vanished")]


def test_the_first_outcome_wins_when_events_and_history_race() -> None:
    # The client asked /history; the end of the prompt came on the socket meanwhile.
    prompts = Prompts("gpu-1")
    watch = submitted(prompts)
    run_to_the_end(prompts, "p1", now=1.0)

    prompts.history(watch, None)  # "vanished" arrives too late
    prompts.cancelled("p1")

    assert isinstance(watch.outcome, PromptResult)


def test_malformed_history_ends_the_prompt_and_abandons_it() -> None:
    prompts = Prompts("gpu-1")
    watch = submitted(prompts)
    with pytest.raises(Malformed):
        prompts.history(watch, {"status": "not an object"})
    prompts.history_malformed(watch, ServerProtocolError("gpu-1", "bad", prompt_id="p1"))
    assert isinstance(watch.outcome, ServerProtocolError)
    assert prompts.abandoned == {"p1"}


# --------------------------------------------------------------------------- silence and loss


def test_a_silent_prompt_is_given_up_after_silence_and_reconnect_timeouts() -> None:
    prompts = Prompts("gpu-1", silence_timeout=30.0, reconnect_timeout=20.0)
    watch = submitted(prompts, now=0.0)
    not_yet_accepted = prompts.watch("p2", 0.0)

    assert prompts.silent(now=30.0) == []
    assert prompts.silent(now=30.5) == [watch]  # not p2: its POST has not answered yet
    why = ServerLostError("gpu-1", "GET /queue failed")

    prompts.unplaceable([watch], why, now=40.0)  # the server cannot say: try again later
    assert not watch.done.is_set()

    prompts.unplaceable([watch], why, now=50.5)  # silent for more than 30 + 20 s
    assert isinstance(watch.outcome, ServerLostError)
    assert "silent for 50 s" in str(watch.outcome)
    assert prompts.abandoned == {"p1"}  # removed from the server once it answers
    assert not not_yet_accepted.done.is_set()


def test_a_lost_server_fails_every_accepted_prompt() -> None:
    events: list[ComfyEvent] = []
    prompts = Prompts("gpu-1", emit=events.append)
    first, second = submitted(prompts, "a"), submitted(prompts, "b")
    submitting = prompts.watch("c", 0.0)

    prompts.fail_all("unreachable for more than 30 s")

    assert isinstance(first.outcome, ServerLostError)
    assert isinstance(second.outcome, ServerLostError)
    assert submitting.outcome is None  # its submit() reports the failure itself
    assert prompts.abandoned == {"a", "b"}
    assert {e.status for e in events if isinstance(e, PromptFinished)} == {"lost"}


def test_a_cancelled_prompt_ends_as_interrupted() -> None:
    events: list[ComfyEvent] = []
    prompts = Prompts("gpu-1", emit=events.append)
    watch = submitted(prompts)
    prompts.cancelled("p1")
    assert isinstance(watch.outcome, ExecutionInterruptedError)
    assert events == [PromptFinished("gpu-1", "p1", "cancelled")]


# --------------------------------------------------------------------------- bookkeeping


def test_a_prompt_id_is_watched_once_and_forgotten_after_its_wait() -> None:
    prompts = Prompts("gpu-1")
    watch = submitted(prompts)
    prompts.watch("pending-post", 0.0)
    with pytest.raises(ValueError, match="already in flight"):
        prompts.watch("p1", 1.0)
    assert prompts.in_flight() == 1  # only prompts the server accepted
    assert prompts.get("p1") is watch

    prompts.forget("p1")
    assert prompts.get("p1") is None
    assert prompts.get(None) is None
