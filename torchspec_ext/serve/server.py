"""``python -m torchspec_ext.serve --draft DIR``: an OpenAI-compatible server that decodes speculatively
with a draft of any family and, with ``--learn``, trains the draft on the traffic it serves.

Listens on 127.0.0.1:8000 unless told otherwise. ``--api-key`` (or $TORCHSPEC_SERVE_API_KEY) makes
every route but /health ask for ``Authorization: Bearer KEY``. SIGTERM (or Ctrl-C) stops accepting
connections, answers every request already in, saves the learned draft and exits 0. With ``--learn``
the learned draft is written to OUTPUT_DIR/draft (export's layout) every --save-interval seconds
and at shutdown; a restart with the same --output-dir resumes from it. docs/serving.md has the rest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from torchspec_ext.drafts.combined import MIN_PROB
from torchspec_ext.options import at_least, option, parse
from torchspec_ext.training.losses import LOSSES

API_KEY_ENV = "TORCHSPEC_SERVE_API_KEY"
DTYPE_CHOICES = ("auto", "float32", "bfloat16")


def _min_prob_check(v) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


@dataclass(frozen=True)
class ServeConfig:
    draft: str = option(
        None,
        "a draft directory (train's output-dir/draft, a checkpoint, or export's output; any family), or 'lookup' "
        "(prompt lookup, no training) or 'target' (the target as its own draft: a ceiling, slow)",
    )
    target: str | None = option(None, "a Hugging Face causal-LM directory (default: SmolLM2-135M-Instruct)")
    host: str = option("127.0.0.1", "the address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "0: any free port (the one taken is printed)", check=at_least(0))
    api_key: str | None = option(None, f"require this key on every route but /health (default: ${API_KEY_ENV})")
    served_model_name: str | None = option(None, "the model's name in the API (default: the target folder's name)")
    dtype: str = option(
        "auto", "of the target and draft; auto: the faster for plain decoding here", choices=DTYPE_CHOICES
    )
    depth: int = option(4, "draft tree depth", check=at_least(1))
    topk: int = option(4, "children per tree node (1: a chain)", check=at_least(1))
    max_nodes: int = option(16, "draft nodes per tree", check=at_least(1))
    min_prob: float = option(
        MIN_PROB, "propose no node below this cumulative draft probability (0: whole trees)", check=_min_prob_check
    )
    combine: bool = option(
        True,
        "verify the draft's tree, prompt lookup and suffix decoding together (eval's 'combined' row), the suffix "
        "cache holding earlier requests' outputs (--no-combine: the draft's tree alone)",
    )
    suffix_cache_tokens: int = option(
        1 << 18,
        "--combine: the suffix cache's size in tokens (12 bytes each; oldest outputs evicted)",
        check=at_least(1),
    )
    max_model_len: int | None = option(None, "context length: prompt + completion (default: the target's)")
    max_tokens: int | None = option(
        None, "cap on a completion whose request gives no max_tokens (default: what the context leaves)"
    )
    max_queue: int = option(64, "requests waiting beyond which new ones get 429", check=at_least(1))
    max_batch: int = option(
        4,
        "requests decoded together, one target forward a step for all (1: one request at a time)",
        check=at_least(1),
    )
    threads: int | None = option(None, "torch threads of the decoding thread (default: torch's)", check=at_least(1))
    metrics_window: int = option(50, "requests in /metrics' rolling acceptance length and tokens/s", check=at_least(1))
    learn: bool = option(False, "train the draft on the traffic (a copy, swapped in between requests)")
    output_dir: str = option("serve_out", "--learn: the learned draft (output-dir/draft) and the learner's state")
    learn_lr: float = option(1e-3, "--learn: learning rate (constant after the warm-up)", check=at_least(0))
    learn_warmup: int = option(10, "--learn: warm-up steps", check=at_least(0))
    learn_loss: str = option("topk_kl", "--learn: the training loss, as train's --loss", choices=LOSSES)
    learn_topk: int = option(64, "--learn: the teacher's top-k per position, as train's --topk", check=at_least(1))
    learn_batch: int = option(2, "--learn: requests per training step", check=at_least(1))
    learn_passes: float = option(
        3.0, "--learn: training steps per request = passes / batch (each request trained on ~passes times)",
        check=at_least(0),
    )  # fmt: skip
    learn_max_length: int = option(512, "--learn: positions kept per request (the last ones)", check=at_least(2))
    replay_positions: int = option(65536, "--learn: replay buffer size in positions", check=at_least(1))
    swap_interval: int = option(4, "--learn: training steps between draft updates", check=at_least(1))
    save_interval: float = option(300.0, "--learn: seconds between checkpoints of the learned draft", check=at_least(1))
    learn_threads: int = option(1, "--learn: torch threads of the training thread", check=at_least(1))
    learn_when: str = option(
        "shared", "--learn: shared: train beside serving; idle: only while no request runs or waits",
        choices=("shared", "idle"),
    )  # fmt: skip
    seed: int = option(0)

    def check(self) -> list[str]:
        return [] if self.draft else ["--draft is required: a draft directory, 'lookup' or 'target'"]


def fail(message: str) -> SystemExit:
    return SystemExit(f"torchspec_ext.serve: {message}")


def load_engine(config: ServeConfig):
    """(engine, target): the target in the chosen dtype and the draft beside it (the learned one from
    --output-dir when --learn resumes)."""
    from torchspec_ext import drafts
    from torchspec_ext.drafts.base import CONFIG_NAME, WEIGHTS_NAME, DraftLoadError
    from torchspec_ext.drafts.combined import CombinationSpec, SuffixSpec
    from torchspec_ext.eval import choose_dtype
    from torchspec_ext.eval import load_draft as load_named_draft
    from torchspec_ext.serve.engine import LocalEngine
    from torchspec_ext.serve.learner import LEARNED_DRAFT
    from torchspec_ext.speculate import TreeSpec, measure_node_cost
    from torchspec_ext.target import default_target_dir, load_target, stop_token_ids

    named = config.draft == "target" or (
        config.draft in drafts.FAMILIES and not drafts.FAMILIES[config.draft].trainable
    )
    source = Path(config.draft)
    learned = Path(config.output_dir) / LEARNED_DRAFT
    if config.learn and named:
        raise fail(f"--learn needs a trainable draft directory; {config.draft!r} has nothing to train")
    if config.learn and (learned / CONFIG_NAME).is_file():
        print(f"[serve] --learn: resuming the learned draft in {learned} (not {source})", file=sys.stderr)
        source = learned
    elif not named and not ((source / CONFIG_NAME).is_file() and (source / WEIGHTS_NAME).is_file()):
        raise fail(
            f"--draft {config.draft}: not a draft directory (no {CONFIG_NAME} and {WEIGHTS_NAME}), nor 'lookup' or "
            "'target'"
        )
    try:
        target, tokenizer = load_target(config.target)
    except (ValueError, OSError) as exc:
        raise fail(f"cannot load the target: {exc}") from None
    prompt = tokenizer("The quick brown fox jumps over the lazy dog.").input_ids
    target, dtype = choose_dtype(target, config.dtype, prompt)
    if named:
        family, draft = load_named_draft(config.draft, target)
    else:
        try:
            family, draft = drafts.load_draft(source, target)
        except (DraftLoadError, OSError) as exc:
            raise fail(f"cannot load draft {str(source)!r}: {exc}") from None
        weight = next(target.parameters())
        draft = draft.to(weight.device, weight.dtype)
    spec = TreeSpec(config.depth, config.topk, config.max_nodes, config.min_prob)
    mode = spec
    if config.combine:
        tree = None if family.name in ("lookup", "suffix") else spec
        suffix = SuffixSpec(max_spec=config.max_nodes, cache_tokens=config.suffix_cache_tokens)
        node_cost = measure_node_cost(target, prompt)
        print(f"[serve] --combine: a verified node costs {node_cost:.3f} of a one-node target forward here",
              file=sys.stderr)  # fmt: skip
        mode = CombinationSpec(tree, suffix=suffix, max_nodes=config.max_nodes, node_cost=node_cost)
    name = config.served_model_name or Path(config.target or default_target_dir()).name
    engine = LocalEngine(target, tokenizer, family, draft, mode, name, stop_token_ids(target, tokenizer))
    if config.max_model_len:
        engine.context_length = min(engine.context_length, config.max_model_len)
    seconds = warm_up(target, family, draft, mode, prompt)
    print(f"[serve] warmed up in {seconds:.1f} s", file=sys.stderr)
    print(
        f"[serve] {name} ({dtype}), draft {source} ({family.title}), proposals: depth {spec.depth}, top-{spec.topk}, "
        f"{spec.max_nodes} nodes, p >= {spec.min_prob:g}"
        + (f", with prompt lookup and suffix decoding in {config.max_nodes} nodes" if config.combine else "")
        + f"; context {engine.context_length}",
        file=sys.stderr,
    )
    return engine


def warm_up(target, family, draft, mode, prompt: list[int], tokens: int = 8) -> float:
    """Seconds to decode ``tokens`` after ``prompt`` with a proposer of its own (its suffix cache and
    calibration then dropped): the one-time costs of a first decode (``small_rows``' timings of the
    target's and the draft's weights, first allocations) are paid before the server takes requests."""
    from torchspec_ext.drafts.combined import build_proposer
    from torchspec_ext.speculate import speculative_generate

    begin = time.perf_counter()
    speculative_generate(target, build_proposer(family, draft, mode), prompt, tokens)
    return time.perf_counter() - begin


def build(config: ServeConfig, address: str = ""):
    """(app, scheduler, learner) ready to run; ``address`` is announced once the server has started."""
    from torchspec_ext.serve.api import ServerState, create_app
    from torchspec_ext.serve.learner import Learner, LearnSettings
    from torchspec_ext.serve.scheduler import Scheduler

    torch.manual_seed(config.seed)
    engine = load_engine(config)
    learner = None
    scheduler = Scheduler(engine, config.max_queue, config.metrics_window, config.threads, max_batch=config.max_batch)
    if config.learn:
        trainable = engine.trainable_draft()
        if trainable is None:
            raise fail("--learn needs a trainable draft")
        family, draft = trainable
        settings = LearnSettings(
            topk=config.learn_topk, loss=config.learn_loss, lr=config.learn_lr, warmup_steps=config.learn_warmup,
            batch_size=config.learn_batch, max_length=config.learn_max_length,
            replay_positions=config.replay_positions, passes=config.learn_passes, swap_interval=config.swap_interval,
            save_interval=config.save_interval, threads=config.learn_threads, when=config.learn_when,
        )  # fmt: skip
        learner = Learner(family, draft, settings, Path(config.output_dir), scheduler.offer_draft, scheduler.busy)
        scheduler.learner = learner
    api_key = config.api_key or os.environ.get(API_KEY_ENV) or None
    state = ServerState(engine, scheduler, api_key, config.max_tokens, learner)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        if learner is not None:
            learner.start()
        if address:
            print(f"[serve] listening on {address}", file=sys.stderr, flush=True)
        yield
        scheduler.drain()  # uvicorn has waited for the open connections: this finds the queue empty
        if learner is not None:
            learner.stop()  # saves the draft
            print(
                f"[serve] learned draft saved in {Path(config.output_dir) / 'draft'} "
                f"({learner.steps} steps on {learner.requests} requests)",
                file=sys.stderr,
            )

    return create_app(state, lifespan), scheduler, learner


def main(argv=None) -> int:
    import uvicorn

    config = parse(ServeConfig, argv, "python -m torchspec_ext.serve", __doc__.split("\n\n")[0])
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        raise fail(f"cannot listen on {config.host}:{config.port}: {exc}") from None
    sock.listen(2048)  # connections made while the model loads wait in the backlog
    host = f"[{config.host}]" if family == socket.AF_INET6 else config.host
    app, _, _ = build(config, f"http://{host}:{sock.getsockname()[1]}")
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=None, lifespan="on")
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; this handler takes it, so
    # a drained SIGTERM exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    print("[serve] stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
