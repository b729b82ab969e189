"""simjax's SIM iteration against the same iteration in PyTorch on EDM's own networks, side by side.

  python benchmarks/peer_pytorch.py --edm=/path/to/NVlabs/edm                 # CIFAR-10 DDPM++, batch 8, fp32
  python benchmarks/peer_pytorch.py --edm=... --batch=64 --amp --compile      # GPU: the peer's best settings
  python benchmarks/peer_pytorch.py --edm=... --rounds=5 --variant=f32

The peer is a user's checkout of NVlabs/edm, imported from --edm (never copied): its `EDMPrecond`
wrapping `SongUNet` built with the same kwargs as simjax's network (`teacher_arch_from_config` of the
config), three copies (teacher frozen; generator and fake score trained with Adam, SiD's settings:
beta1 0, beta2 0.999). One peer iteration is SiD's structure, written here from SiD's paper:
- fake-score step: x_g = G(sigma_init z) without gradients (eval mode), sigma log-normal, the DSM loss
  lambda(sigma) |D_fake(x_g + sigma n) - x_g|^2 (train mode: dropout), backward, Adam;
- generator step: x_g = G(sigma_init z) (train mode), sigma from the Karras map of t ~ U[0, t_max],
  x_t = x_g + sigma n, teacher and fake score on x_t with their parameters frozen (the gradient flows
  through x_t only), SiD's loss at alpha 1, backward, Adam.
simjax's side is `benchmarks/sim_step.py`'s iteration for the same config, batch and variant.

Both run in this process, alternately: each round times `--calls` iterations of one framework, then of
the other, so a shared machine's drift hits both alike. Prints one JSON line: ms and images/s per
framework (median over rounds), the per-round ratio simjax images/s / peer images/s (median, range),
compile times (simjax's ahead-of-time compile; torch.compile's first call). simjax runs with its training
run's CPU process settings (`--reuse_host_memory`, default auto: freed host memory kept by malloc, CPU
programs inline); malloc's settings are process-wide, so the peer runs with them too. Exits with status 2 and
one line when torch or the EDM checkout is missing.
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _fail(message):
  print(f"peer_pytorch: {message}", file=sys.stderr)
  sys.exit(2)


def import_edm(path):
  """EDM's training.networks from a checkout (its own torch_utils beside it)."""
  root = Path(path)
  if not (root / "training" / "networks.py").is_file() or not (root / "torch_utils").is_dir():
    _fail(f"{root} is not a checkout of NVlabs/edm (needs training/networks.py and torch_utils/); "
          "git clone https://github.com/NVlabs/edm and pass --edm=<it>.")
  sys.path.insert(0, str(root))
  import training.networks as edm_networks  # pylint: disable=import-outside-toplevel,import-error
  return edm_networks


class PeerIteration:
  """SiD's iteration on three EDM networks in PyTorch (see the module docstring)."""

  def __init__(self, torch, edm_networks, arch, config, batch, device, amp, compile_models):
    self.torch, self.batch, self.device, self.amp = torch, batch, device, amp
    kwargs = {k: v for k, v in arch.items() if k not in ("precond",)}
    kwargs.pop("class_name", None)
    precond = getattr(edm_networks, arch.get("precond", "EDMPrecond"))
    torch.manual_seed(0)
    self.teacher = precond(**kwargs).to(device).eval().requires_grad_(False)
    self.generator = precond(**kwargs).to(device).train()
    self.fake = precond(**kwargs).to(device).train()
    self.generator.load_state_dict(self.teacher.state_dict())
    self.fake.load_state_dict(self.teacher.state_dict())
    adam = lambda net, lr: torch.optim.Adam(net.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    self.opt_g = adam(self.generator, float(config.optim.generator.lr))
    self.opt_f = adam(self.fake, float(config.optim.fake.lr))
    self.shape = (batch, int(arch["img_channels"]), int(arch["img_resolution"]), int(arch["img_resolution"]))
    self.sigma_init = float(config.sigma_init)
    self.t_max = float(config.loss.t_max)
    self.p_mean, self.p_std = float(config.fake_p_mean), float(config.fake_p_std)
    self.sigma_min, self.sigma_max, self.rho, self.sigma_data = 0.002, 80.0, 7.0, 0.5
    calls = [self.teacher, self.generator, self.fake]
    if compile_models:
      calls = [torch.compile(m) for m in calls]
    self.call_teacher, self.call_generator, self.call_fake = calls

  def _autocast(self):
    return self.torch.autocast(self.device, dtype=self.torch.bfloat16, enabled=self.amp)

  def _generate(self, z):
    sigma = self.torch.full((self.batch,), self.sigma_init, device=self.device)
    return self.call_generator(self.sigma_init * z, sigma)

  def fake_step(self):
    torch = self.torch
    z = torch.randn(self.shape, device=self.device)
    self.generator.eval()
    with torch.no_grad(), self._autocast():
      x_g = self._generate(z).float()
    self.generator.train()
    sigma = (torch.randn(self.batch, device=self.device) * self.p_std + self.p_mean).exp()
    weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
    with self._autocast():
      d = self.call_fake(x_g + sigma[:, None, None, None] * torch.randn_like(x_g), sigma).float()
    loss = (weight[:, None, None, None] * (d - x_g) ** 2).sum() / self.batch
    self.opt_f.zero_grad(set_to_none=True)
    loss.backward()
    self.opt_f.step()

  def generator_step(self):
    torch = self.torch
    z = torch.randn(self.shape, device=self.device)
    self.fake.requires_grad_(False)
    with self._autocast():
      x_g = self._generate(z).float()
    t = torch.rand(self.batch, device=self.device) * self.t_max
    inv_rho = 1.0 / self.rho
    sigma = (self.sigma_min**inv_rho + (1 - t) * (self.sigma_max**inv_rho - self.sigma_min**inv_rho)) ** self.rho
    x_t = x_g + sigma[:, None, None, None] * torch.randn_like(x_g)
    with self._autocast():
      a = self.call_teacher(x_t, sigma).float()
      b = self.call_fake(x_t, sigma).float()
    y = a - b
    weight = 1.0 / (x_g - a).abs().mean(dim=(1, 2, 3), keepdim=True).detach().clamp_min(1e-8)
    loss = (weight * y * ((a - x_g) - y)).sum() / self.batch  # SiD at alpha 1
    self.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    self.opt_g.step()
    self.fake.requires_grad_(True)

  def __call__(self):
    self.fake_step()
    self.generator_step()
    if self.device == "cuda":
      self.torch.cuda.synchronize()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--edm", required=True, help="path to a checkout of NVlabs/edm")
  parser.add_argument("--config", default="configs/cifar10.py")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--variant", default="f32", help="simjax's perf variant (benchmarks/sim_step.py VARIANTS)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--calls", type=int, default=1, help="iterations per framework per round")
  parser.add_argument("--amp", action="store_true", help="peer under bf16 autocast (GPU)")
  parser.add_argument("--compile", action="store_true", help="peer networks under torch.compile")
  parser.add_argument("--reuse_host_memory", default="auto", help="simjax's perf.reuse_host_memory for the "
                      "process (auto: on for the CPU backend, as a training run; the peer shares the setting)")
  args = parser.parse_args()
  if min(args.batch, args.rounds, args.calls) < 1:
    parser.error("--batch, --rounds and --calls must be >= 1.")
  import sim_step  # pylint: disable=import-outside-toplevel,import-error
  if args.variant not in sim_step.VARIANTS:
    parser.error(f"--variant={args.variant}: use one of {sorted(sim_step.VARIANTS)}.")
  if args.reuse_host_memory not in sim_step.perf_lib.HOST_MEMORY_MODES:
    parser.error(f"--reuse_host_memory={args.reuse_host_memory}: use one of {sim_step.perf_lib.HOST_MEMORY_MODES}.")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    _fail("torch is not installed; pip install -e '.[parity]'.")
  edm_networks = import_edm(args.edm)

  import jax  # pylint: disable=import-outside-toplevel
  from simjax.pipelines.image_teacher import teacher_arch_from_config  # pylint: disable=import-outside-toplevel
  from simjax.training import sim_steps  # pylint: disable=import-outside-toplevel

  config = sim_step.load_config(args.config)
  # Without it every simjax call faults its temporaries in again (measured idle: 19.8 s against 15.4 s per
  # iteration).
  sim_step.apply_host_memory_mode(config, args.reuse_host_memory)
  config, nets, params, state, consts, specs, optimizers, mesh = sim_step.build(config, args.batch, args.variant)
  iteration = jax.jit(sim_steps.make_sim_iteration(nets, config, mesh, specs, optimizers), donate_argnums=0)
  compiled, simjax_compile, _, _, _ = sim_step.compile_stats(iteration, state, consts)
  holder = {"state": state}

  def simjax_call():
    holder["state"], _ = compiled(holder["state"], consts)
    jax.block_until_ready(holder["state"].step)

  device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
  arch = teacher_arch_from_config(config)
  peer = PeerIteration(torch, edm_networks, arch, config, args.batch, device, args.amp, args.compile)
  start = time.perf_counter()
  peer()  # warm-up (torch.compile compiles here)
  peer_first = time.perf_counter() - start
  simjax_call()  # warm-up

  times = {"simjax": [], "peer": []}
  for _ in range(args.rounds):
    for name, fn in (("simjax", simjax_call), ("peer", peer)):
      start = time.perf_counter()
      for _ in range(args.calls):
        fn()
      times[name].append((time.perf_counter() - start) / args.calls)
  ratios = [p / s for s, p in zip(times["simjax"], times["peer"])]  # = simjax img/s over peer img/s
  med = {k: statistics.median(v) for k, v in times.items()}
  print(json.dumps({
      "config": args.config, "batch": args.batch, "simjax_variant": args.variant, "device": device,
      "reuse_host_memory": args.reuse_host_memory,
      "peer": {"amp": args.amp, "compile": args.compile, "torch": torch.__version__,
               "threads": torch.get_num_threads()},
      "params_per_network": sum(p.numel() for p in peer.teacher.parameters()),
      "ms_per_iteration": {k: round(1e3 * v, 1) for k, v in med.items()},
      "images_per_sec": {k: round(args.batch / v, 3) for k, v in med.items()},
      "simjax_over_peer_images_per_sec": round(statistics.median(ratios), 3),
      "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)], "rounds": args.rounds,
      "simjax_compile_s": round(simjax_compile, 1), "peer_first_call_s": round(peer_first, 1),
      "per_round_ms": {k: [round(1e3 * x) for x in v] for k, v in times.items()},
  }), flush=True)
  if not math.isfinite(med["peer"]):
    sys.exit(1)


if __name__ == "__main__":
  main()
