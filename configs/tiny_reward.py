"""A tiny reward model on the bundled preference sample: CPU, about a minute."""

import reward  # the config file beside this one


def get_config():
    c = reward.get_config()
    c.steps = 60
    c.checkpoint_every = 20
    c.eval_every = 20
    c.model.base = "tiny"
    c.model.compute_dtype = "float32"
    c.model.remat = "none"
    c.data.update(source="bundled", seq_buckets=(64, 128), eval_fraction=0.2, batch_size=16)
    c.optim.update(lr=2e-3, warmup_steps=10, weight_decay=0.0)
    c.mesh.update(data=1, fsdp=1, tensor=1)
    return c
