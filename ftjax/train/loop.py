"""The one train loop: every objective (SFT, DPO family, reward, ...) runs through `run`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import time
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ftjax import hostmem
from ftjax import objectives
from ftjax import sharding as shd
from ftjax.models import Decoder
from ftjax.train import evaluate, state as state_lib
from ftjax.train.checkpoint import Checkpointer, abstract
from ftjax.train.metrics import MetricWriter, plot_loss_curve
from ftjax.train.optim import make_optimizer
from ftjax.train.step import finalize_metrics, make_eval_step, make_train_step, merge_params


class NonFiniteLossError(RuntimeError):
  pass


def _log(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


def _check_workdir(workdir: str):
  try:
    os.makedirs(workdir, exist_ok=True)
    # Per-process name (host + pid): every process of a multi-host run probes the same workdir;
    # with one shared name one process removed the file the other was about to remove (ENOENT),
    # so that process exited while the other waited for it in jax.distributed (seen in CI).
    probe = os.path.join(workdir, f".write_test.{socket.gethostname()}.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"--workdir {workdir}: not writable ({e.strerror})") from e


def _data_iter(config, tokenizer, split: str, global_batch: int, seed: int, epochs=None):
  kind = config.data.get("kind", "sft")
  kw = dict(split=split, global_batch_size=global_batch, seq_len=config.train.seq_len, seed=seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_epochs=epochs)
  if kind == "sft":
    from ftjax import data  # pylint: disable=g-import-not-at-top
    return data.build_iterator(config.data, tokenizer, **kw)
  if kind in ("preference", "kto"):
    from ftjax.data import preference  # pylint: disable=g-import-not-at-top
    return preference.build_preference_iterator(config.data, tokenizer, **kw)
  raise ValueError(f"config.data.kind: unknown kind {kind!r} (sft | preference | kto)")


class _Preempted:
  """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and returns."""

  def __init__(self):
    self.flag = False
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    _log(f"received signal {signum}: checkpointing and stopping")
    self.flag = True

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def _validate(config, mesh, rules):
  tc = config.train
  dp = shd.data_parallel_size(mesh, rules)
  accum = int(tc.get("grad_accum_steps", 1))
  if tc.batch_size % (accum * dp):
    raise ValueError(f"config.train.batch_size={tc.batch_size} is not divisible by "
                     f"grad_accum_steps ({accum}) x data-parallel size ({dp})")
  if tc.batch_size % jax.process_count():
    raise ValueError(f"config.train.batch_size={tc.batch_size} is not divisible by the "
                     f"process count {jax.process_count()}")
  return accum


def _batch_putters(mesh, rules, accum: int):
  """Host batches -> global arrays: train [accum, micro, ...], eval [batch, ...]."""
  batch_axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
  train_sharding = NamedSharding(mesh, P(None, batch_axes))
  eval_sharding = NamedSharding(mesh, P(batch_axes))

  def put_train(b):
    local = {k: np.asarray(v).reshape((accum, -1) + np.asarray(v).shape[1:])
             for k, v in b.items()}
    return jax.make_array_from_process_local_data(train_sharding, local)

  def put_eval(b):
    return jax.make_array_from_process_local_data(
        eval_sharding, {k: np.asarray(v) for k, v in b.items()})
  return put_train, put_eval


def _make_eval(config, model, tokenizer, jeval, put_eval, wrap, ref):
  """run_eval(params, frozen) -> held-out objective metrics and greedy exact match."""
  from ftjax import data  # pylint: disable=g-import-not-at-top
  ec = config.eval
  eval_batch = int(ec.get("batch_size", config.train.batch_size))
  kind = config.data.get("kind", "sft")
  gen_examples = []
  if ec.get("exact_match_examples", 0) and kind != "kto":
    rows = data.load_examples(config.data, "eval")
    if kind == "preference":  # the answer is the chosen completion
      rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    gen_examples = evaluate.sample_examples(rows, int(ec.exact_match_examples))

  def run_eval(params, frozen):
    out = {}
    if ec.get("batches", 0):
      out.update(evaluate.eval_loss(
          jeval, params, frozen,
          lambda: wrap(_data_iter(config, tokenizer, "eval", eval_batch, 0, epochs=1), "eval"),
          put_eval, int(ec.batches), ref))
    if gen_examples:
      out.update(evaluate.exact_match(model, params, frozen, tokenizer, gen_examples,
                                      max_new_tokens=int(ec.get("max_new_tokens", 16))))
    return out
  return run_eval


def run(config, workdir: str) -> Dict[str, Any]:
  """Trains per `config`, resuming from `workdir` if it has checkpoints. Returns a summary."""
  _check_workdir(workdir)
  mesh = shd.make_mesh(config.mesh)
  rules = shd.rules_from_config(config.sharding.get("rules"))
  accum = _validate(config, mesh, rules)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  model_parts = _build_model(config, mesh, rules)
  with shd.mesh_rules(mesh, rules):
    r = _setup(config, workdir, mesh, rules, accum, *model_parts)
    try:
      summary = _train(config, r)
    finally:  # finish async saves even when a step fails
      r.ckpt.close()
      r.writer.close()
  summary.update(data_stats=getattr(r.it, "stats", {}))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=float)
    try:
      plot_loss_curve(workdir)
    except Exception as e:  # pylint: disable=broad-except  # a plot must never fail a run
      _log(f"loss curve not written: {e}")
  _print_summary(summary)
  return summary


@dataclasses.dataclass
class _Run:
  """Everything one run's loop needs, built by `_setup`."""
  model_cfg: Any
  state: Dict[str, Any]  # params (trainable), opt_state, step, rng
  frozen: Any  # params that never train (PEFT base, HFT's frozen half lives in `state`)
  ref: Any  # DPO-family reference params (objective.reference='copy') or None
  it: Any  # train data iterator (checkpointable state)
  ckpt: Checkpointer
  writer: MetricWriter
  jstep: Any
  run_eval: Any
  put_train: Any
  start: int
  total_steps: int


def _build_model(config, mesh, rules):
  """(tokenizer, model_cfg, model, trainable, frozen, rng): params created already sharded."""
  from ftjax import data  # pylint: disable=g-import-not-at-top
  tokenizer = data.load_tokenizer(config.data.get("tokenizer"))
  rng = jax.random.key(int(config.get("seed", 0)))
  model_cfg = state_lib.model_config(config, tokenizer)
  model_cfg, params = state_lib.init_params(config, model_cfg, mesh, rules, rng)
  trainable, frozen = state_lib.split_params(config, params)
  del params
  _log(f"model: {state_lib.count_params(trainable):,} trainable / "
       f"{state_lib.count_params(frozen):,} frozen params; mesh {dict(mesh.shape)}")
  if jax.default_backend() == "cpu" and hostmem.tuned_env() is not None:
    _log(f"host memory: glibc default; {hostmem.HINT}")
  return tokenizer, model_cfg, Decoder(model_cfg), trainable, frozen, rng


def _setup(config, workdir: str, mesh, rules, accum: int, tokenizer, model_cfg, model,
           trainable, frozen, rng) -> _Run:
  """Sharded train state (restored if `workdir` has a checkpoint), data, jitted step and eval."""
  from ftjax.objectives.preference import reference_cache_wrapper  # pylint: disable=g-import-not-at-top
  tc = config.train
  seed = int(config.get("seed", 0))
  total_steps = int(tc.steps)
  tx, sched = make_optimizer(config.optim, total_steps)
  obj_fn = objectives.get(config.objective.name)
  update_scale_fn = None
  if "peft" in config and config.peft.get("method") == "hft":
    from ftjax import peft  # pylint: disable=g-import-not-at-top
    update_scale_fn = peft.hft_update_scale_fn(trainable, config.peft)
  step_fn = make_train_step(model, obj_fn, config.objective, tx, sched,
                            update_scale_fn=update_scale_fn)
  eval_fn = make_eval_step(model, obj_fn, config.objective)

  opt_state = jax.jit(tx.init)(trainable)
  # jit with out_shardings (not device_put) so this also works when devices span processes.
  step0, rng0 = jax.jit(lambda: (jnp.zeros((), jnp.int32), jax.random.fold_in(rng, 7)),
                        out_shardings=shd.replicated(mesh))()
  state = {"params": trainable, "opt_state": opt_state, "step": step0, "rng": rng0}
  ref = None
  if config.objective.get("reference") == "copy":  # frozen copy of the initial weights
    ref = jax.tree_util.tree_map(lambda x: x.copy(), merge_params(trainable, frozen))

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  wrap = reference_cache_wrapper(config, workdir, model, merge_params(trainable, frozen),
                                 tokenizer)  # objective.reference='precomputed' only
  it = wrap(_data_iter(config, tokenizer, "train", tc.batch_size, seed), "train")
  start = 0
  if ckpt.latest_step() is not None:
    start = ckpt.latest_step()
    state, frozen, data_state, meta = ckpt.restore(start, abstract(state), abstract(frozen))
    it.set_state(data_state)
    _log(f"resumed from step {start} ({workdir})")

  put_train, put_eval = _batch_putters(mesh, rules, accum)
  run_eval = _make_eval(config, model, tokenizer, jax.jit(eval_fn), put_eval, wrap, ref)
  return _Run(model_cfg=model_cfg, state=state, frozen=frozen, ref=ref, it=it,
              ckpt=ckpt, writer=MetricWriter(workdir, resume_step=start,
                                             enabled=jax.process_index() == 0),
              jstep=jax.jit(step_fn, donate_argnums=(0,)), run_eval=run_eval,
              put_train=put_train, start=start, total_steps=total_steps)


def _train(config, r: _Run) -> Dict[str, Any]:
  """The step loop: train, log, eval and checkpoint on schedule; stop on SIGTERM/SIGINT."""
  tc, ec = config.train, config.eval
  log_every = int(tc.get("log_every", 10))
  ckpt_every = int(config.checkpoint.get("every", 0))
  summary: Dict[str, Any] = {"start_step": r.start}
  state, step, first_loss, pbar = r.state, r.start, None, None
  try:
    # The signal handler covers the step-0 eval too: a SIGTERM there stops after one step with a
    # checkpoint instead of killing the process.
    with _Preempted() as pre:
      if r.start == 0 and ec.get("every", 0):
        before = r.run_eval(state["params"], r.frozen)
        r.writer.write(0, before)
        summary["eval_before"] = before
        _log(f"step 0 eval: {_fmt(before)}")
      pbar = _progress(r.start, r.total_steps)
      t_last, tokens_since = time.perf_counter(), 0.0
      while step < r.total_steps:
        try:
          batch = next(r.it)
        except StopIteration:
          _log("data exhausted; stopping")
          break
        state, metrics = r.jstep(state, r.frozen, r.put_train(batch), r.ref)
        tokens_since += _count_tokens(batch)
        step += 1
        pbar.update(1)
        last = step == r.total_steps
        do_eval = ec.get("every", 0) and (step % int(ec.every) == 0 or last)
        stop = pre.flag or step == int(tc.get("stop_at_step", 0) or -1)
        do_ckpt = (ckpt_every and step % ckpt_every == 0) or last or stop
        if step % log_every == 0 or step == r.start + 1 or last or do_eval or do_ckpt:
          m = _host_metrics(metrics, step, r.ckpt)
          now = time.perf_counter()
          m["tokens_per_sec"] = tokens_since / max(now - t_last, 1e-9)
          t_last, tokens_since = now, 0.0
          if first_loss is None:
            first_loss = m["train_loss"]
          if do_eval:
            m.update(r.run_eval(state["params"], r.frozen))
            t_last = time.perf_counter()  # eval time is not training throughput
          r.writer.write(step, m)
          pbar.set_postfix(loss=f"{m['train_loss']:.4f}")
          summary["last"] = m
        if do_ckpt:
          r.ckpt.save(step, state, r.frozen, r.it.get_state(),
                      {"step": step, "model": _model_meta(r.model_cfg)},
                      metrics=summary.get("last"))
        if stop:
          summary["preempted"] = True
          break
  finally:
    if pbar is not None:
      pbar.close()
  summary.update(end_step=step, first_loss=first_loss)
  return summary


def _host_metrics(metrics, step: int, ckpt: Checkpointer) -> Dict[str, float]:
  """Device metrics -> host floats plus perplexity; a non-finite loss stops the run unsaved."""
  m = finalize_metrics(metrics)
  if not (math.isfinite(m["train_loss"]) and math.isfinite(m["grad_norm"])):
    raise NonFiniteLossError(
        f"non-finite loss {m['train_loss']} (grad norm {m['grad_norm']}) at step {step}; "
        f"stopped without saving (last good checkpoint: step {ckpt.latest_step()})")
  m.pop("tokens", None)
  m["perplexity"] = math.exp(min(m.get("loss", m["train_loss"]), 50.0))
  return m


def _count_tokens(batch) -> int:
  """Non-padding tokens in the global batch (all token-bearing keys; host-side, no sync)."""
  n = sum(int((np.asarray(v) > 0).sum()) for k, v in batch.items() if k.endswith("segment_ids"))
  return n * jax.process_count()


def _model_meta(cfg) -> dict:
  return {k: v for k, v in dataclasses.asdict(cfg).items()
          if isinstance(v, (int, float, str, bool, type(None)))}


def _fmt(m: dict) -> str:
  return " ".join(f"{k}={v:.4g}" for k, v in m.items())


def _progress(start: int, total: int):
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True,
              disable=jax.process_index() != 0)


def _print_summary(s: dict):
  last = s.get("last", {})
  before = s.get("eval_before", {})
  lines = [f"done: steps {s['start_step']} -> {s['end_step']}"]
  if s.get("first_loss") is not None:
    lines.append(f"  train loss      {s['first_loss']:.4f} -> {last.get('train_loss', float('nan')):.4f}")
  for key in ("eval_loss", "eval_exact_match"):
    if key in last or key in before:
      lines.append(f"  {key:<15} {before.get(key, float('nan')):.4f} -> "
                   f"{last.get(key, float('nan')):.4f}")
  _log("\n".join(lines))
