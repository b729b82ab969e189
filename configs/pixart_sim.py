"""SIM's text-to-image distillation (Luo et al. 2024, Sec. 5.2): a one-step PixArt-alpha-512 generator from the
guided PixArt-XL-2-512 teacher, data-free from prompts (SIM's release names SAM-LLaVA captions), in the SD VAE's
latent space, with the pseudo-Huber SIM loss, fed sigma_init * z at sigma_init 2.5.

  python -m simjax.main --config=configs/pixart_sim.py --workdir=gs://BUCKET/pixart_sim \
    --config.teacher.checkpoint=/models/PixArt-XL-2-512x512 --config.text.encoder=/models/PixArt-XL-2-512x512 \
    --config.text.tokenizer=/models/PixArt-XL-2-512x512 --config.vae=/models/PixArt-XL-2-512x512 \
    --config.text.prompts=/data/sam_llava_captions.jsonl --config.text.prompt_field=caption

Every path is the user's (a diffusers pipeline root serves as all four). What runs it, from
benchmarks/transformer_memory.py (README, "What a SIM run of three PixArt-XL networks needs"): the state
of the three 610M-parameter networks is ~23 GB in float32 and, with block remat, ~1.5 GB per image of the
generator step. SIM reports 4 x A100 for 2 days; here that is --config.mesh_shape="(4, 1)" on one 4-GPU
node (80 GB cards: batch up to ~30 per card), or on a TPU v5e pod slice the parameters and Adam state
sharded over the fsdp axis, e.g. 16 chips --config.mesh_shape="(4, 4)". The first stage encodes the prompts
with T5-XXL (4.7B parameters, ~19 GB in float32; bfloat16 halves it) into text.cache_dir once, split over
the hosts; T5 then leaves memory and training streams the cached embeddings.
"""
from simjax import config_files

common = config_files.sibling(__file__, "common")


def get_config(arg=None):
  del arg
  c = common.text_to_image_config()
  c.data.shape = (64, 64, 4)          # 512 x 512 images through the VAE's 8x downsampling
  c.teacher.kind = "checkpoint"
  c.teacher.checkpoint = ""           # PixArt-XL-2-512x512: a diffusers pipeline / transformer folder, or the .pth
  c.teacher.runtime.scan_blocks = True  # one compiled block for 28
  c.teacher.guidance = 4.5            # PixArt-alpha's sampler default
  c.teacher.null = "empty_prompt"     # diffusers' PixArt checkpoints hold no null embedding; the .pth's
                                      # y_embedding is read with teacher.null='checkpoint'
  c.text.tokenizer = ""               # T5's spiece.model, its tokenizer/ folder or the pipeline root
  c.text.encoder = ""                 # T5-v1_1-XXL: its folder or the pipeline root
  c.text.max_length = 120
  c.text.prompts = ""                 # .txt / .jsonl / tfds:NAME/SPLIT
  c.text.cache_dtype = "bfloat16"
  c.text.shard_size = 4096
  c.text.pool_shards = 4              # 16k prompts on the devices at a time (120 x 4096 bf16 each: 1 MB)
  c.text.pool_every = 500
  c.vae = ""                          # sd-vae-ft-ema: its folder or the pipeline root

  c.batch_size = 64                   # global; split over the data axis
  c.num_steps = 20_000
  c.optim.generator.lr = 5e-6         # a starting point, not SIM's setting: its release is inference-only
  c.optim.fake.lr = 5e-6
  c.ema_half_life_images = 500_000.0
  c.loss.name = "sim"
  c.loss.distance = "pseudo_huber"
  c.perf.compute_dtype = "bfloat16"
  for name in ("generator", "teacher", "fake"):
    c.perf.remat[name] = "blocks"     # ~0.5 GB per image per network instead of ~9.5 (transformer_memory.py)
  c.mesh_shape = (-1, 1)
  c.log_every = 50
  c.checkpoint_every = 500
  c.grid_every = 500
  c.eval.features = "none"
  c.eval.batch_size = 16
  c.eval.teacher_steps = 14
  return c
