"""How much of each encoder conv's output falls where ELU is not ~linear (x < -0.5), at init."""
import numpy as np, jax, jax.numpy as jnp, json
from eegkd_jax.configs import supervised
from eegkd_jax.data import pipeline
from eegkd_jax.models import build_model
cfg = supervised.get_config("ear")
cfg.data.simulated.hours = 2.0  # the cohort the experiments ran on (already built)
cohort = pipeline.prepare_cohort(cfg.data)
s = cohort.subjects[0]
_, ear, _ = cohort.read_epochs(s, range(70))
x = jnp.asarray(ear.reshape(10, 7 * ear.shape[1], ear.shape[-1]), jnp.float32)
out = {}
for init in ("torch", "glorot"):
    m = cfg.model.copy_and_resolve_references(); m.initializer = init
    net = build_model(m, in_channels=3, sampling_rate=cohort.sampling_rate, epoch_seconds=30.0)
    fr = []
    for seed in range(3):
        v = net.init({"params": jax.random.PRNGKey(seed), "dropout": jax.random.PRNGKey(seed)}, x[:1], train=False)
        _, state = net.apply(v, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=lambda mdl, name: type(mdl).__name__ == "Conv")
        inter = state["intermediates"]
        vals = [np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(inter)[0] if "encoder" in jax.tree_util.keystr(path) or "bottom" in jax.tree_util.keystr(path)]
        fr.append([float((a < -0.5).mean()) for a in vals])
    out[init] = np.round(np.mean(fr, 0), 3).tolist()
print(json.dumps({"fraction_of_encoder_conv_outputs_below_-0.5_at_init (levels 0..8, 10 ear windows of sim-01, mean of 3 inits)": out}))
