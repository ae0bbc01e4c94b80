"""One chat answer with its outputs checked (node/client/verify.py): text is shown once checked, and
a wrong output rolls the answer back to where it went wrong.

We chose *verify before showing*: a token is handed to the person only when the output it was
sampled from has passed a check, so no wrong token is ever shown, before or after a detection (the
cost is that text arrives in bursts of up to 1/rate tokens; with `--verify-rate all` token by
token). When a check fails at position q, the tokens sampled from outputs at q and later are dropped,
the session fails over away from the outvoted server and replays, and generation starts again at q
with the same sampler: greedy output is then the model's own, token for token (`chat --local`).
Checks run beside the answer (one at a time): the primary chain does not wait for the second.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from llmswarm.models.chat import ChatTurn
from llmswarm.models.generate import GenerationResult, Sampler, Steps, generation_steps
from llmswarm.models.local import ClientModel
from llmswarm.node.client.verify import Verifier


async def checked_turn(turn: ChatTurn, model: ClientModel, sampler: Sampler, max_new_tokens: int,
                       verifier: Verifier, show: Callable[[str], None]) -> GenerationResult:
    """Generate `turn`'s answer through `verifier.session`, checked; `show` gets checked text only."""
    feed, start = turn.conv.split(turn.prompt)
    turn.steps.close()  # the turn's own generator is replaced by ours (same arguments, held-back text)
    prompt_end = start + len(feed)  # the first generated token is fed at this position
    tokens: list[int] = []  # tokens[i] was sampled from the output at prompt_end - 1 + i
    shown = 0
    began, first_at = time.perf_counter(), 0.0

    def on_token(token: int) -> None:
        nonlocal first_at
        tokens.append(token)
        first_at = first_at or time.perf_counter()

    def release(checked: int) -> None:
        nonlocal shown
        upto = min(len(tokens), checked - prompt_end + 1)
        while shown < upto:
            show(turn.stream.add(tokens[shown]))
            shown += 1

    def restart(wrong_at: int) -> Steps:
        """Generation from position `wrong_at` on: every token sampled from a wrong output dropped."""
        wrong_at = max(wrong_at, start)
        good = max(0, wrong_at - prompt_end + 1)
        del tokens[good:]
        again = feed[wrong_at - start :] if wrong_at < prompt_end else [tokens[wrong_at - prompt_end]]
        return generation_steps(model.parts, again, wrong_at, max_new_tokens - good, sampler, model.stop_ids,
                                on_token)

    steps = generation_steps(model.parts, feed, start, max_new_tokens, sampler, model.stop_ids, on_token)
    hidden, position = next(steps)
    quiet = False
    round_trips = 0  # swarm steps, replays after a detection included
    while True:
        if quiet:  # the failover after a detection: the person has had their one line
            notify, verifier.session.notify = verifier.session.notify, lambda _: None
            try:
                out = await verifier.session.step(hidden, position)
            finally:
                verifier.session.notify, quiet = notify, False
        else:
            out = await verifier.session.step(hidden, position)
        verifier.log(hidden, position, out)
        round_trips += 1
        wrong = await verifier.collect()
        if wrong is None and verifier.due():
            await verifier.start()
        finished: GenerationResult | None = None
        if wrong is None:
            try:
                hidden, position = steps.send(out)
            except StopIteration as done:
                finished = done.value
                wrong = await verifier.finish()  # the last outputs are checked before the answer ends
        if wrong is not None:  # from collect or finish: no check is in flight while we fail over
            await verifier.settle(wrong)
            quiet = True
            steps.close()
            steps = restart(wrong)
            hidden, position = next(steps)
            continue
        release(verifier.checked)
        if finished is not None:
            release(prompt_end + len(tokens))  # nothing could be checked: shown as it is
            now = time.perf_counter()
            return GenerationResult(token_ids=tokens, stopped=finished.stopped, prompt_tokens=len(feed),
                                    time_to_first_token_s=(first_at or now) - began,
                                    decode_s=now - (first_at or now), steps=round_trips)
