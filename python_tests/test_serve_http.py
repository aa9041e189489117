"""``python -m torchspec_ext.serve`` as a client meets it: a server started in a subprocess on a free
port, on the tiny predictable target, driven with the official ``openai`` client."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai", reason="the serve tests need the 'serve' extra (pip install -e .[test])")
try:
    import httpx2 as httpx  # what the openai client is built on
except ImportError:
    import httpx

from torchspec_ext import drafts  # noqa: E402
from torchspec_ext.target import load_target  # noqa: E402

KEY = "test-key"
ROOT = Path(__file__).resolve().parent.parent


class Server:
    """A server subprocess; its stderr goes to ``log``. ``url`` once it listens."""

    def __init__(self, tmp_path: Path, *args: str, env: dict | None = None):
        self.log = tmp_path / f"server-{time.monotonic_ns()}.log"
        command = [sys.executable, "-m", "torchspec_ext.serve", "--port", "0", "--dtype", "float32", *args]
        paths = [str(ROOT), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **(env or {})}
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log.open("w"), env=environment)
        deadline = time.monotonic() + 300
        while True:
            text = self.log.read_text()
            found = re.search(r"listening on (http://\S+)", text)
            if found:
                self.url = found.group(1)
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"the server did not start:\n{text}")
            time.sleep(0.2)

    def client(self, key=KEY):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=300)

    def metric(self, name: str, key=KEY) -> float:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=60).text
        found = re.search(rf"^torchspec_{re.escape(name)} (\S+)$", text, re.M)
        assert found, f"no {name} in /metrics:\n{text}"
        return float(found.group(1))

    def wait_for(self, name: str, at_least: float, seconds: float = 240) -> float:
        deadline = time.monotonic() + seconds
        while (value := self.metric(name)) < at_least:
            assert time.monotonic() < deadline, f"{name} stayed at {value} < {at_least}"
            time.sleep(0.2)
        return value

    def stop(self, timeout: float = 240) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def target_and_draft(predictable_target, tmp_path_factory):
    target, tokenizer = load_target(predictable_target)
    family = drafts.family("eagle3")
    options = family.options({"draft_vocab": 4096}).resolved(on_gpu=False)
    ids = torch.tensor(tokenizer("The capital of France is Paris. Two plus two is four. " * 8).input_ids)
    draft = family.new_draft(target, [(ids, torch.ones_like(ids, dtype=torch.bool))], options)
    directory = tmp_path_factory.mktemp("tiny_draft")
    draft.save(directory)
    return target, tokenizer, directory


@pytest.fixture(scope="module")
def server(predictable_target, target_and_draft, tmp_path_factory):
    _, _, draft = target_and_draft
    tmp = tmp_path_factory.mktemp("serve")
    args = ["--target", str(predictable_target), "--draft", str(draft), "--min-prob", "0", "--api-key", KEY]
    s = Server(tmp, *args, "--served-model-name", "tiny", "--max-queue", "16")
    yield s
    s.close()


def chat_ids(tokenizer, text):
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False).input_ids


def greedy(target, ids, n):
    from torchspec_ext.target import stop_token_ids

    eos = stop_token_ids(target)
    with torch.no_grad():
        out = target.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
        )
    return out[0, len(ids) :].tolist()


QUESTIONS = ["Tell me about Paris.", "What is two plus two?", "Name a colour.", "Why is the sky blue?"]


def test_health_models_and_the_api_key(server):
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}  # no key needed
    for route in ("/v1/models", "/metrics"):
        refused = httpx.get(f"{server.url}{route}", headers={"Authorization": "Bearer wrong"}, timeout=30)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert [m.id for m in server.client().models.list().data] == ["tiny"]


def test_greedy_chat_is_plain_decoding_streamed_or_not(server, target_and_draft):
    target, tokenizer, _ = target_and_draft
    client = server.client()
    for question in QUESTIONS[:2]:
        messages = [{"role": "user", "content": question}]
        out = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=24, temperature=0, extra_body={"return_token_ids": True}
        )
        ids = chat_ids(tokenizer, question)
        assert out.prompt_token_ids == ids
        want = greedy(target, ids, 24)
        assert out.choices[0].token_ids == want
        assert out.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)
        assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(want)
        assert out.choices[0].finish_reason == ("length" if len(want) == 24 else "stop")
        assert out.speculative["target_forwards"] <= len(want)
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=24, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == out.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_completions_streamed_and_not(server, target_and_draft):
    target, tokenizer, _ = target_and_draft
    client = server.client()
    out = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
    )
    ids = tokenizer("Once upon a time").input_ids
    assert out.choices[0].token_ids == greedy(target, ids, 12)
    streamed = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_max_tokens_stop_and_seed_as_the_api_defines_them(server, target_and_draft):
    _, tokenizer, _ = target_and_draft
    client = server.client()
    prompt = "Once upon a time"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    text = full.choices[0].text
    assert full.usage.completion_tokens == 16 and full.choices[0].finish_reason == "length"
    short = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and text.startswith(short.choices[0].text)
    # A stop string from the middle of the greedy text: the text ends before it, reason "stop".
    cut = len(tokenizer.decode(tokenizer(prompt + text).input_ids[len(tokenizer(prompt).input_ids) :][:5]))
    stop = text[cut : cut + 3]
    assert stop.strip() and len(stop) == 3
    for stream in (False, True):
        out = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=[stop], stream=stream
        )
        chunks = list(out) if stream else [out]
        got = "".join(c.choices[0].text for c in chunks if c.choices)
        assert got == text[: text.index(stop)]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    sampled = [
        client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0, seed=seed)
        .choices[0]
        .text
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1]


def test_bad_requests_get_4xx_in_openais_shape_and_the_server_goes_on(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{server.url}/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    too_long = "context_length_exceeded"
    cases = [
        ("{not json", 400, None),
        (json.dumps({"model": "tiny"}), 400, None),  # no messages
        (json.dumps({"model": "tiny", "messages": hi, "temperature": 3}), 400, None),
        (json.dumps({"model": "tiny", "messages": hi, "n": 2}), 400, None),
        (json.dumps({"model": "gpt-9", "messages": hi}), 404, "model_not_found"),
        (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi " * 400}]}), 400, too_long),
        (json.dumps({"model": "tiny", "messages": hi, "max_tokens": 10**6}), 400, too_long),
    ]
    for body, status, code in cases:
        response = httpx.post(url, content=body, headers=headers, timeout=60)
        assert response.status_code == status, (body[:60], response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"] == code
    missing = httpx.get(f"{server.url}/v1/nothing", headers=headers, timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    out = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert out.usage.completion_tokens == 4


def test_concurrent_clients_are_all_answered_once_and_right(server, target_and_draft):
    target, tokenizer, _ = target_and_draft
    results, errors = {}, []

    def ask(i):
        try:
            out = server.client().chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"{QUESTIONS[i % 4]} ({i})"}], max_tokens=16,
                temperature=0, extra_body={"return_token_ids": True},
            )  # fmt: skip
            results[i] = out
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    steps, rows = server.metric("decode_steps_total"), server.metric("decode_step_requests_total")
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == list(range(6))
    steps, rows = server.metric("decode_steps_total") - steps, server.metric("decode_step_requests_total") - rows
    assert rows / steps > 1.5, (rows, steps)  # decoded together (--max-batch 4 by default), not one by one
    assert len({r.id for r in results.values()}) == 6
    for i, out in results.items():
        ids = chat_ids(tokenizer, f"{QUESTIONS[i % 4]} ({i})")
        assert out.prompt_token_ids == ids and out.choices[0].token_ids == greedy(target, ids, 16)


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    cancelled = server.metric('requests_total{status="cancelled"}')
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then the client is gone
    server.wait_for('requests_total{status="cancelled"}', cancelled + 1)
    assert server.metric("requests_running") == 0 and server.metric("queue_depth") == 0
    out = server.client().completions.create(model="tiny", prompt="Once upon a time", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4


def test_learn_updates_the_draft_sigterm_drains_saves_and_a_restart_resumes(
    predictable_target, target_and_draft, tmp_path
):
    target, tokenizer, draft = target_and_draft
    out_dir = tmp_path / "learned"
    args = [
        "--target", str(predictable_target), "--draft", str(draft), "--min-prob", "0", "--learn",
        "--output-dir", str(out_dir), "--swap-interval", "1", "--learn-warmup", "1", "--learn-topk", "32",
        "--served-model-name", "tiny",
    ]  # fmt: skip
    server = Server(tmp_path, *args, env={"TORCHSPEC_SERVE_API_KEY": KEY})
    try:
        client = server.client()
        for question in QUESTIONS:
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0
            )
        server.wait_for("draft_updates_total", 0)  # the metric exists
        server.wait_for("learner_steps_total", 2)
        # A request after an update runs with it, and greedy decoding is still the target's.
        name = "tiny"
        after = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=16, temperature=0,
            extra_body={"return_token_ids": True},
        )  # fmt: skip
        assert after.speculative["draft_version"] >= 1 and server.metric("draft_updates_total") >= 1
        assert after.choices[0].token_ids == greedy(target, chat_ids(tokenizer, QUESTIONS[0]), 16)
        # SIGTERM while a stream is in flight: the stream still ends whole, then the server saves and exits 0.
        stream = client.completions.create(
            model=name, prompt="Once upon a time", max_tokens=40, temperature=0, stream=True
        )
        first = next(iter(stream))
        assert server.process.send_signal(signal.SIGTERM) is None
        rest = list(stream)
        assert [c.choices[0].finish_reason for c in [first, *rest] if c.choices][-1] == "length"
        assert server.process.wait(240) == 0
        steps = server.log.read_text()
        assert "learned draft saved" in steps
    finally:
        server.close()
    _, learned = drafts.load_draft(out_dir / "draft", target)
    _, original = drafts.load_draft(draft, target)
    assert not torch.equal(learned.fc.weight, original.fc.weight)
    config = json.loads((out_dir / "draft" / "config.json").read_text())
    assert "torchspec_ext" not in config  # export's layout, as engines load it
    restarted = Server(tmp_path, *args, env={"TORCHSPEC_SERVE_API_KEY": KEY})
    try:
        assert f"resuming the learned draft in {out_dir / 'draft'}" in restarted.log.read_text()
        assert restarted.metric("learner_steps_total") >= 2
        assert restarted.stop() == 0
    finally:
        restarted.close()


def test_the_default_target_with_prompt_lookup(tmp_path):
    """The embedded SmolLM2-135M-Instruct, a draft that needs no training: greedy answers are plain decoding's."""
    target, tokenizer = load_target()
    server = Server(tmp_path, "--draft", "lookup", "--max-tokens", "16")
    try:
        out = server.client(key="unused").chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Name three colours."}], temperature=0,
            extra_body={"return_token_ids": True},
        )  # fmt: skip
        ids = chat_ids(tokenizer, "Name three colours.")
        assert out.choices[0].token_ids == greedy(target, ids, 16)
        assert server.stop() == 0
    finally:
        server.close()
