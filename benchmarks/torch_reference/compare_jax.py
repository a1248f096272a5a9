"""Cross-check: do our Flax models compute the same function as the PyTorch reference?

Timing the two frameworks side by side only means something if they run the same network. This
script copies the reference's weights into `eegkd_jax.models` and compares outputs, in two steps
because the two frameworks live in separate venvs:

  .venv-torch/bin/python -m benchmarks.torch_reference.compare_jax export --out /tmp/torch_ref.npz
  .venv/bin/python       -m benchmarks.torch_reference.compare_jax check --ref /tmp/torch_ref.npz

`export` builds both reference models (seeded), runs a few training-mode forward passes so that
BatchNorm running statistics are not the trivial 0 / 1, and saves every parameter and buffer, a
(2, 3, 6000) input and the evaluation-mode logits and features. `check` maps the weights onto the
Flax variable trees (asserting that every Flax variable is filled exactly once, with the right
shape), runs `module.apply(..., train=False)` and prints the largest differences; it exits 1 if
they exceed the tolerance.

The transformer is exported with `third_branch_reads_first_channel=False` because ours feeds
channel c to branch c (the original's re-use of channel 1 in branch 3 is a bug we don't copy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

if not __package__:
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(os.path.dirname(_here)))

# float32 through 25 conv levels (U-Sleep) or 3 attention blocks: differences of a few 1e-5
# are summation order; an architectural mismatch shows up as O(0.1) or more.
TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------
# torch side
# --------------------------------------------------------------------------------------------


def _switch_off_dropout(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0


def export(path: str, seed: int = 0) -> None:
    """Writes the reference weights, an input and the reference's outputs to `path` (.npz)."""
    import torch

    from benchmarks.torch_reference import models

    torch.manual_seed(seed)
    arrays = {}
    built = {"usleep": models.build("usleep"),
             "cmt": models.CrossModalTransformer(third_branch_reads_first_channel=False)}
    for name, model in built.items():
        with torch.no_grad():
            model.train()
            for _ in range(3):  # move BatchNorm running statistics away from 0 / 1
                model(torch.randn(4, 3, 6000) * 2.0 + 0.5)
            model.eval()
            x = torch.randn(2, 3, 6000)
            logits, features = model(x)
            for key, value in model.state_dict().items():
                if not key.endswith("num_batches_tracked"):
                    arrays[f"{name}/state/{key}"] = value.numpy().copy()
            arrays[f"{name}/input"] = x.numpy()
            arrays[f"{name}/logits"] = logits.numpy()
            arrays[f"{name}/features"] = features.numpy()
            # One training-mode pass with dropout off: batch statistics and the running-average
            # update must agree too (that is what the training step does).
            _switch_off_dropout(model)
            model.train()
            counts = {}  # samples per channel each BatchNorm normalises over (for the var check)
            hooks = [module.register_forward_pre_hook(
                         lambda m, inputs, key=key: counts.__setitem__(
                             key, inputs[0].numel() // inputs[0].shape[1]))
                     for key, module in model.named_modules()
                     if isinstance(module, torch.nn.BatchNorm1d)]
            x_train = torch.randn(4, 3, 6000)
            train_logits, _ = model(x_train)
            for hook in hooks:
                hook.remove()
            for key, count in counts.items():
                arrays[f"{name}/bn_count/{key}"] = np.asarray(count)
            arrays[f"{name}/train_input"] = x_train.numpy()
            arrays[f"{name}/train_logits"] = train_logits.numpy()
            for key, value in model.state_dict().items():
                if key.endswith(("running_mean", "running_var")):
                    arrays[f"{name}/after_train/{key}"] = value.numpy().copy()
    np.savez(path, **arrays)
    print(f"wrote {len(arrays)} arrays to {path}")


# --------------------------------------------------------------------------------------------
# JAX side: torch names -> Flax variable paths
# --------------------------------------------------------------------------------------------


class _Mapping:
    """Moves reference tensors (torch names) to Flax variable paths, one layer at a time.

    `flat` collects {"params/...": array, "batch_stats/...": array}; `batch_norms` remembers
    torch BatchNorm name -> Flax path for the running-statistics check; `state` shrinks as
    tensors are taken, so anything left over at the end was not mapped.
    """

    def __init__(self, state: dict):
        self.state = dict(state)
        self.flat: dict = {}
        self.batch_norms: dict = {}

    def conv(self, torch_prefix: str, flax_path: str) -> None:
        # torch Conv1d weight (out, in, k) -> Flax Conv kernel (k, in, out)
        weight = self.state.pop(f"{torch_prefix}.weight")
        self.flat[f"params/{flax_path}/kernel"] = weight.transpose(2, 1, 0)
        self.flat[f"params/{flax_path}/bias"] = self.state.pop(f"{torch_prefix}.bias")

    def dense(self, torch_prefix: str, flax_path: str) -> None:
        # torch Linear (out, in) or 1x1 Conv1d (out, in, 1) -> Flax Dense kernel (in, out)
        weight = self.state.pop(f"{torch_prefix}.weight")
        self.flat[f"params/{flax_path}/kernel"] = weight.reshape(weight.shape[0], -1).T
        self.flat[f"params/{flax_path}/bias"] = self.state.pop(f"{torch_prefix}.bias")

    def norm(self, torch_prefix: str, flax_path: str, batch: bool = True) -> None:
        self.flat[f"params/{flax_path}/scale"] = self.state.pop(f"{torch_prefix}.weight")
        self.flat[f"params/{flax_path}/bias"] = self.state.pop(f"{torch_prefix}.bias")
        if batch:
            self.flat[f"batch_stats/{flax_path}/mean"] = self.state.pop(
                f"{torch_prefix}.running_mean")
            self.flat[f"batch_stats/{flax_path}/var"] = self.state.pop(
                f"{torch_prefix}.running_var")
            self.batch_norms[torch_prefix] = flax_path

    def attention(self, torch_prefix: str, flax_path: str, num_heads: int) -> None:
        # torch keeps q, k, v stacked as one (3 d, d) projection applied as x @ W.T; Flax has
        # one DenseGeneral each with kernel (d, heads, head_dim), output kernel (heads, hd, d).
        weight = self.state.pop(f"{torch_prefix}.in_proj_weight")
        bias = self.state.pop(f"{torch_prefix}.in_proj_bias")
        d = weight.shape[1]
        head_dim = d // num_heads
        for i, part in enumerate(("query", "key", "value")):
            rows = slice(i * d, (i + 1) * d)
            self.flat[f"params/{flax_path}/{part}/kernel"] = weight[rows].T.reshape(
                d, num_heads, head_dim)
            self.flat[f"params/{flax_path}/{part}/bias"] = bias[rows].reshape(num_heads, head_dim)
        out = self.state.pop(f"{torch_prefix}.out_proj.weight")
        self.flat[f"params/{flax_path}/out/kernel"] = out.T.reshape(num_heads, head_dim, d)
        self.flat[f"params/{flax_path}/out/bias"] = self.state.pop(f"{torch_prefix}.out_proj.bias")

    def take(self, torch_name: str, flax_path: str) -> None:
        self.flat[f"params/{flax_path}"] = self.state.pop(torch_name)

    def done(self) -> "_Mapping":
        if self.state:
            raise ValueError(f"reference weights left unmapped: {sorted(self.state)}")
        return self


def usleep_variables(state: dict, depth: int = 12) -> _Mapping:
    """Reference U-Sleep weights -> eegkd_jax's U-Sleep variables."""
    m = _Mapping(state)
    for i in range(depth):
        m.conv(f"encoder.{i}.features.0", f"encoder_{i}/conv")
        m.norm(f"encoder.{i}.features.2", f"encoder_{i}/bn")
        m.conv(f"decoder.{i}.after_upsample.0", f"decoder_{i}/upconv/conv")
        m.norm(f"decoder.{i}.after_upsample.2", f"decoder_{i}/upconv/bn")
        m.conv(f"decoder.{i}.after_skip.0", f"decoder_{i}/conv/conv")
        m.norm(f"decoder.{i}.after_skip.2", f"decoder_{i}/conv/bn")
    m.conv("bottom.0", "bottom/conv")
    m.norm("bottom.2", "bottom/bn")
    m.dense("head.0", "classifier/segment_conv")
    m.dense("head.3", "classifier/hidden")
    m.dense("head.5", "classifier/logits")
    return m.done()


def cmt_variables(state: dict, num_heads: int = 8) -> _Mapping:
    """Reference transformer weights -> eegkd_jax's transformer variables."""
    m = _Mapping(state)
    paths = {"wide": ("single", 1), "fine": ("fine", 3), "medium": ("coarse", 2)}
    for c in range(3):
        tok, flax_tok = f"tokenizers.{c}", f"branch_{c}/tokenizer"
        for torch_path, (flax_name, convs) in paths.items():
            for j in range(convs):  # convs at 0, 2, 4 (LeakyReLU between), BatchNorm right after
                m.conv(f"{tok}.{torch_path}.{2 * j}", f"{flax_tok}/{flax_name}_conv{j}")
            m.norm(f"{tok}.{torch_path}.{2 * convs}", f"{flax_tok}/{flax_name}_bn")
        m.conv(f"{tok}.mix.0", f"{flax_tok}/mix_conv")
        m.norm(f"{tok}.mix.2", f"{flax_tok}/mix_bn")
        m.take(f"{tok}.cls", f"branch_{c}/cls")
        m.attention(f"self_attention.{c}.attention", f"branch_{c}/self_attn", num_heads)
        m.norm(f"self_attention.{c}.norm", f"branch_{c}/norm", batch=False)
        m.dense(f"feed_forward.{c}.inner", f"ff_{c}/linear1")
        m.dense(f"feed_forward.{c}.outer", f"ff_{c}/linear2")
        m.norm(f"feed_forward.{c}.norm", f"ff_{c}/norm", batch=False)
    m.take("cross_cls", "cross_cls")
    m.attention("cross_attention.attention", "cross_attn", num_heads)
    m.norm("cross_attention.norm", "cross_norm", batch=False)
    m.dense("head", "head")
    return m.done()


def check(path: str) -> int:
    """Loads `path` (from `export`), runs our Flax models on the same weights and input."""
    import jax
    from flax import traverse_util
    from flax.core import unfreeze

    from eegkd_jax.configs import common
    from eegkd_jax.models import build_model, init_variables

    def module_without_dropout(name):
        config = common.MODELS[name]()
        if "dropout" in config:
            config.dropout = 0.0
        return build_model(config, in_channels=3)

    ref = np.load(path)
    mappers = {"usleep": usleep_variables, "cmt": cmt_variables}
    failed = False
    for name, mapper in mappers.items():
        prefix = f"{name}/state/"
        state = {k[len(prefix):]: ref[k] for k in ref.files if k.startswith(prefix)}
        mapping = mapper(state)
        flat = mapping.flat
        module = build_model(common.MODELS[name](), in_channels=3)
        x = ref[f"{name}/input"].transpose(0, 2, 1)  # (B, C, T) -> (B, T, C)
        expected = jax.eval_shape(lambda: init_variables(module, jax.random.key(0), x.shape))
        expected_flat = traverse_util.flatten_dict(unfreeze(expected), sep="/")
        if set(expected_flat) != set(flat):
            raise ValueError(f"{name}: variables differ: missing "
                             f"{sorted(set(expected_flat) - set(flat))}, extra "
                             f"{sorted(set(flat) - set(expected_flat))}")
        for key, value in flat.items():
            if tuple(value.shape) != tuple(expected_flat[key].shape):
                raise ValueError(f"{name}: {key} has shape {value.shape}, Flax expects "
                                 f"{expected_flat[key].shape}")
        variables = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
        logits, features = module.apply(variables, x, train=False)
        logits = np.asarray(logits).reshape(ref[f"{name}/logits"].shape)
        features = np.asarray(features)
        ref_features = ref[f"{name}/features"]
        if ref_features.ndim == 3:  # U-Sleep's decoder output, torch (B, F, T) -> ours (B, T, F)
            ref_features = ref_features.transpose(0, 2, 1)
        logit_diff = float(np.max(np.abs(logits - ref[f"{name}/logits"])))
        feature_diff = float(np.max(np.abs(features - ref_features)))
        ok = logit_diff < TOLERANCE and feature_diff < TOLERANCE
        failed |= not ok
        print(json.dumps({"model": name, "train": False, "max_abs_logit_diff": logit_diff,
                          "max_abs_feature_diff": feature_diff,
                          "logit_scale": float(np.max(np.abs(ref[f"{name}/logits"]))),
                          "same_function": ok}))
        failed |= not _check_train_mode(name, ref, module_without_dropout(name), variables,
                                    mapping)
    return 1 if failed else 0


def _check_train_mode(name: str, ref, module, variables: dict, mapping: _Mapping) -> bool:
    """One training-mode step's logits and running-average update versus the reference."""
    import jax

    x = ref[f"{name}/train_input"].transpose(0, 2, 1)
    (logits, _), updates = module.apply(variables, x, train=True, mutable=["batch_stats"],
                                        rngs={"dropout": jax.random.key(0)})
    logits = np.asarray(logits).reshape(ref[f"{name}/train_logits"].shape)
    logit_diff = float(np.max(np.abs(logits - ref[f"{name}/train_logits"])))
    # Map the reference's updated running statistics the same way as the weights.
    prefix = f"{name}/after_train/"
    after = {k[len(prefix):]: ref[k] for k in ref.files if k.startswith(prefix)}
    counts = {k[len(f"{name}/bn_count/"):]: int(ref[k]) for k in ref.files
              if k.startswith(f"{name}/bn_count/")}
    ours = {"batch_stats/" + "/".join(k): np.asarray(v) for k, v in
            _flatten(updates["batch_stats"]).items()}
    worst_mean = worst_var = worst_var_if_biased = 0.0
    worst_var_layer = ""
    for key, torch_after in after.items():
        layer = key.rsplit(".", 1)[0]
        stat = "mean" if key.endswith("running_mean") else "var"
        flax_key = f"batch_stats/{mapping.batch_norms[layer]}/{stat}"
        before = mapping.flat[flax_key]
        mine = ours[flax_key]
        if stat == "mean":
            worst_mean = max(worst_mean, float(np.max(np.abs(mine - torch_after))))
            continue
        relative = float(np.max(np.abs(mine - torch_after) / np.abs(torch_after)))
        if relative > worst_var:
            worst_var, worst_var_layer = relative, f"{layer} (n={counts[layer]})"
        # torch's running update uses the unbiased batch variance (x n / (n - 1)); the value it
        # would hold with the biased one, to tell that known difference from a real mismatch:
        n = counts[layer]
        as_biased = 0.9 * before + (torch_after - 0.9 * before) * (n - 1) / n
        worst_var_if_biased = max(worst_var_if_biased,
                                  float(np.max(np.abs(mine - as_biased) / np.abs(as_biased))))
    ok = logit_diff < TOLERANCE and worst_mean < TOLERANCE and worst_var < TOLERANCE
    print(json.dumps({"model": name, "train": True, "dropout": 0.0,
                      "max_abs_logit_diff": logit_diff,
                      "max_abs_running_mean_diff": worst_mean,
                      "max_rel_running_var_diff": worst_var,
                      "worst_running_var_layer": worst_var_layer,
                      "max_rel_running_var_diff_if_torch_used_biased_var": worst_var_if_biased,
                      # True: the only difference is that torch's running_var update uses the
                      # unbiased batch variance (n / (n - 1)) and ours the biased one.
                      "var_diff_explained_by_bias_correction":
                          worst_var >= TOLERANCE and worst_var_if_biased < TOLERANCE,
                      "same_function": ok}))
    return ok


def _flatten(tree, prefix=()):
    out = {}
    for key, value in tree.items():
        if hasattr(value, "items"):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export_parser = sub.add_parser("export", help="(torch venv) write reference weights + outputs")
    export_parser.add_argument("--out", required=True)
    export_parser.add_argument("--seed", type=int, default=0)
    check_parser = sub.add_parser("check", help="(JAX venv) compare eegkd_jax.models against them")
    check_parser.add_argument("--ref", required=True)
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.out, args.seed)
        return 0
    return check(args.ref)


if __name__ == "__main__":
    sys.exit(main())
