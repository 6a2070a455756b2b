"""`ftjax train | export | upcycle` (also `python -m ftjax ...`).

  ftjax train --config configs/sft_tiny.py[:arg] --workdir DIR [--config.a.b=value ...]
  ftjax export --workdir DIR --out HF_DIR [--adapter]   (reward run: a sequence-classification dir)
  ftjax upcycle --src HF_DIR --out HF_DIR --num_experts 8 --top_k 2

Bad input ends in one line `ftjax: error: ...` on stderr and exit status 1 (2 for bad flags).
"""

from __future__ import annotations

import sys

USAGE = __doc__


def _flags_for(cmd: str, argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  if cmd == "train":
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
    # Override flags (--config.a.b=v) are discovered from the argv given here.
    config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "output / resume directory", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", 1, "jax.distributed process count", flag_values=fv)
    flags.DEFINE_integer("process_id", 0, "jax.distributed process index", flag_values=fv)
  elif cmd == "export":
    flags.DEFINE_string("workdir", None, "a training workdir", flag_values=fv)
    flags.DEFINE_string("out", None, "output directory", flag_values=fv)
    flags.DEFINE_bool("adapter", False, "write the PEFT adapter only (else merged model)",
                      flag_values=fv)
  elif cmd == "upcycle":
    flags.DEFINE_string("src", None, "dense HF model directory", flag_values=fv)
    flags.DEFINE_string("out", None, "output HF directory", flag_values=fv)
    flags.DEFINE_integer("num_experts", 8, "experts per MoE layer", flag_values=fv)
    flags.DEFINE_integer("top_k", 2, "experts per token", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "router init seed", flag_values=fv)
  return fv


def init_distributed(coordinator_address, num_processes: int, process_id: int):
  """Multi-process JAX; CPU collectives go through gloo so tests run on one machine."""
  import jax  # pylint: disable=g-import-not-at-top
  if not coordinator_address:
    return
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # pylint: disable=broad-except  # option absent on some backends
    pass
  jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def _train(fv):
  from ftjax import train  # pylint: disable=g-import-not-at-top
  if fv.config is None or not fv.workdir:
    raise ValueError("train needs --config FILE[:arg] and --workdir DIR")
  init_distributed(fv.coordinator_address, fv.num_processes, fv.process_id)
  summary = train.run(fv.config, fv.workdir)
  return 0 if "end_step" in summary else 1


def _export(fv):
  from ftjax import export  # pylint: disable=g-import-not-at-top
  if not fv.workdir or not fv.out:
    raise ValueError("export needs --workdir DIR and --out DIR")
  path = export.export_workdir(fv.workdir, fv.out, adapter_only=fv.adapter)
  print(f"wrote {path}")
  return 0


def _upcycle(fv):
  from ftjax import upcycle  # pylint: disable=g-import-not-at-top
  if not fv.src or not fv.out:
    raise ValueError("upcycle needs --src DIR and --out DIR")
  upcycle.upcycle_checkpoint(fv.src, fv.out, num_experts=fv.num_experts, top_k=fv.top_k,
                             seed=fv.seed)
  print(f"wrote {fv.out}")
  return 0


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    return 0 if len(argv) >= 2 else 2
  cmd, rest = argv[1], argv[2:]
  handlers = {"train": _train, "export": _export, "upcycle": _upcycle}
  if cmd not in handlers:
    print(f"ftjax: error: unknown command {cmd!r} (train | export | upcycle)", file=sys.stderr)
    return 2
  args = [f"ftjax {cmd}"] + rest
  fv = _flags_for(cmd, args)
  try:
    fv(args)
  except Exception as e:  # pylint: disable=broad-except  # absl raises several flag errors
    msg = str(e).strip().splitlines()
    print(f"ftjax: error: {msg[-1] if msg else e}", file=sys.stderr)
    return 2
  try:
    return handlers[cmd](fv)
  except (ValueError, KeyError, FileNotFoundError, PermissionError, RuntimeError) as e:
    print(f"ftjax: error: {e}", file=sys.stderr)
    return 1


def entry():
  # glibc reads its tunables at start-up: re-exec once with huge pages for XLA's step buffer.
  from ftjax import hostmem  # pylint: disable=g-import-not-at-top
  hostmem.reexec_tuned()
  sys.exit(main())


if __name__ == "__main__":
  entry()
