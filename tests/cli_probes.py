"""What a new user tries, and what each command must answer: a list of CLI probes and a runner for them.

A probe is (name, argv, environment, expected): expected is ("error", text), a one-line error containing text,
no traceback; or ("ok", text), exit status 0 with text in the output.  argv may name the files of
:func:`make_fixtures` as {name} (and {new}: a fresh folder).  tests/test_probes.py runs them in-process
through fastgan.cli.main; :func:`run_probe` also classifies what an older fastgan did (traceback, silent).
"""
import contextlib
import io
import os
import shutil
import sys
import tempfile
import traceback

TINY = ["--batchSize", "4", "--ngf", "4", "--ndf", "4", "--builtin-images", "16", "--manualSeed", "1",
        "--device", "cpu", "--max-steps", "1", "--outf", "{new}"]
NO_DEVICE = TINY[:10] + TINY[12:]  # TINY without --device cpu
NO_INTERPRETER = {"TRITON_INTERPRET": "0"}  # Triton cannot run CPU tensors: as on a machine without a GPU
CACHE = {"FASTGAN_CACHE_DIR": "{scratch}/cache"}  # the image caches of the folder probes


def train(*flags, outf=None):
    return ["train", *TINY, *flags] + (["--outf", outf] if outf else [])


PROBES = [
    # train: numbers out of range
    ("train --lr -1", train("--lr", "-1"), {}, ("error", "argument --lr: expected a number > 0, got -1")),
    ("train --lr 0", train("--lr", "0"), {}, ("error", "argument --lr: expected a number > 0")),
    ("train --lr nan", train("--lr", "nan"), {}, ("error", "argument --lr: expected a number > 0, got nan")),
    ("train --beta1 2", train("--beta1", "2"), {}, ("error", "argument --beta1: expected a number in [0, 1)")),
    ("train --beta2 1", train("--beta2", "1"), {}, ("error", "argument --beta2: expected a number in [0, 1)")),
    ("train --nz 0", train("--nz", "0"), {}, ("error", "argument --nz: expected an integer in [1, 65536]")),
    ("train --ngf 0", train("--ngf", "0"), {}, ("error", "argument --ngf: expected an integer in [1, 65536]")),
    ("train --ndf -4", train("--ndf", "-4"), {}, ("error", "argument --ndf: expected an integer in [1, 65536]")),
    ("train --ngf 10**9", train("--ngf", "1000000000"), {}, ("error", "argument --ngf: expected an integer in")),
    ("train --ngf abc", train("--ngf", "abc"), {}, ("error", "argument --ngf: expected an integer in [1, 65536], "
                                                               "got 'abc'")),
    ("train --workers -1", train("--workers", "-1"), {}, ("error", "argument --workers: expected an integer >= 0")),
    ("train --batchSize 1", train("--batchSize", "1"), {}, ("error", "argument --batchSize: expected an integer "
                                                                     ">= 2")),
    ("train --batchSize 0", train("--batchSize", "0"), {}, ("error", "argument --batchSize")),
    ("train --imageSize 0", train("--imageSize", "0"), {}, ("error", "argument --imageSize: expected an integer >= 1")),
    ("train --niter -1", train("--niter", "-1"), {}, ("error", "argument --niter: expected an integer >= 0")),
    ("train --max-steps -5", train("--max-steps", "-5"), {}, ("error", "argument --max-steps")),
    ("train --label-smoothing 1.5", train("--label-smoothing", "1.5"), {},
     ("error", "argument --label-smoothing: expected a number in [0, 1)")),
    ("train --d-steps 0", train("--d-steps", "0"), {}, ("error", "argument --d-steps: expected an integer >= 1")),
    ("train --g-steps 0", train("--g-steps", "0"), {}, ("error", "argument --g-steps: expected an integer >= 1")),
    ("train --gp-weight -1", train("--loss", "wgan-gp", "--gp-weight", "-1"), {},
     ("error", "argument --gp-weight: expected a number >= 0, got -1")),
    ("train --gp-weight with bce", train("--gp-weight", "5"), {}, ("error", "--gp-weight applies to --loss wgan-gp")),
    ("train --manualSeed -3", train("--manualSeed", "-3"), {}, ("error", "argument --manualSeed")),
    ("train --builtin-images 0", train("--builtin-images", "0"), {}, ("error", "argument --builtin-images")),
    ("train --log-every 0", train("--log-every", "0"), {}, ("error", "argument --log-every")),
    ("train --save-every -1", train("--save-every", "-1"), {}, ("error", "argument --save-every")),
    ("train batch larger than the data", train("--batchSize", "64"), {},
     ("error", "fewer than one batch of 64; lower --batchSize")),
    ("train --imageSize 32", train("--imageSize", "32"), {}, ("error", "preset dcgan64 makes 64x64 images")),
    ("train --label-smoothing with hinge", train("--loss", "hinge", "--label-smoothing", "0.1"), {},
     ("error", "--label-smoothing applies to the bce and lsgan losses")),
    # train: data, output folder, device, backend
    ("train --dataroot without --dataset", train("--dataroot", "{emptydir}"), {},
     ("error", "is not read by --dataset builtin")),
    ("train --dataset folder without --dataroot", train("--dataset", "folder"), {}, ("error", "needs --dataroot")),
    ("train --dataroot missing", train("--dataset", "folder", "--dataroot", "{missing}"), {},
     ("error", "does not exist")),
    ("train --dataroot empty", train("--dataset", "folder", "--dataroot", "{emptydir}"), {},
     ("error", "holds no images")),
    ("train mnist without files", train("--dataset", "mnist", "--dataroot", "{emptydir}"), {},
     ("error", "no MNIST file found")),
    ("train --dataset cifar10", train("--dataset", "cifar10"), {}, ("error", "--dataset cifar10 needs --dataroot")),
    ("train --dataset lsun10", train("--dataset", "lsun10"), {}, ("error", "argument --dataset: invalid choice")),
    ("train --dry-run", train("--dry-run"), {}, ("ok", "nothing written")),
    ("train --mps", train("--mps"), {}, ("error", "not on Apple's MPS")),
    ("train --accel", ["train", *NO_DEVICE, "--accel"], {}, ("ok", "done: 1 steps")),
    ("train --accel --device cpu", train("--accel"), {}, ("error", "--accel and --device cpu disagree; drop one")),
    ("train --on-nan stop", train("--on-nan", "stop"), {}, ("ok", "done: 1 steps")),
    ("train --on-nan skip", train("--on-nan", "skip"), {},
     ("error", "argument --on-nan: skip is not offered: dropping a non-finite step's update would mean copying")),
    ("train --on-nan ignore", train("--on-nan", "ignore"), {}, ("error", "argument --on-nan: expected stop, got")),
    ("train --ngpu 2", train("--ngpu", "2"), {}, ("error", "torchrun --nproc-per-node 2")),
    ("train --cuda --device cpu", train("--cuda"), {}, ("error", "--cuda and --device cpu disagree")),
    ("train --cuda --device bogus", train("--cuda", "--device", "bogus"), {},
     ("error", "--device bogus: ")),
    ("train --dataset lsun, missing folder", train("--dataset", "lsun", "--dataroot", "{emptydir}",
                                                   "--classes", "church"), {}, ("error", "church")),
    ("train --outf is a file", train(outf="{afile}"), {}, ("error", "is a file, not a folder")),
    ("train --outf under a file", train(outf="{afile}/sub"), {}, ("error", "is not a writable folder")),
    ("train --device cuda", train("--device", "cuda"), {}, ("error", "no CUDA device is available here")),
    ("train --device tpu", train("--device", "tpu"), {}, ("error", "--device tpu")),
    ("train --backend triton on CPU", train("--backend", "triton"), NO_INTERPRETER,
     ("error", "backend='triton' cannot run here")),
    ("train --graph on without a GPU", train("--graph", "on"), {},
     ("error", "--graph on: CUDA graphs run on a CUDA device, and this step's models are on cpu; drop --graph on")),
    ("train --graph sometimes", train("--graph", "sometimes"), {}, ("error", "argument --graph: invalid choice")),
    ("train --level L2 without triton", train("--level", "L2"), {},
     ("error", "--level L2 runs fastgan's Triton convolutions, and --backend auto is torch here; add --backend")),
    ("train --level L3", train("--level", "L3"), {}, ("error", "argument --level: invalid choice")),
    ("train FASTGAN_BACKEND=bogus", train(), {"FASTGAN_BACKEND": "bogus"},
     ("error", "FASTGAN_BACKEND must be one of")),
    ("train FASTGAN_BACKEND=triton on CPU", train(), {"FASTGAN_BACKEND": "triton", **NO_INTERPRETER},
     ("error", "FASTGAN_BACKEND=triton (set in the environment) cannot be used")),
    # train: checkpoints to start or resume from
    ("train --netG missing", train("--netG", "{missing}"), {}, ("error", "does not exist")),
    ("train --netG junk", train("--netG", "{junk}"), {}, ("error", "is not a readable checkpoint")),
    ("train --netG empty file", train("--netG", "{empty}"), {}, ("error", "empty or cut short")),
    ("train --netG a folder", train("--netG", "{emptydir}"), {}, ("error", "is a folder")),
    ("train --netG pickled module", train("--netG", "{module}"), {}, ("error", "holds pickled Python objects")),
    ("train --netG a discriminator", train("--netG", "{run}/netD_epoch_0.pth"), {}, ("error", "does not fit")),
    ("train --netG wider than --ngf", train("--netG", "{run}/netG_epoch_0.pth", "--ngf", "8"), {},
     ("error", "shape mismatch: main.0.weight")),
    ("train --netG train_state", train("--netG", "{run}/train_state_epoch_0.pt"), {},
     ("error", "is a fastgan train_state file")),
    ("train --netG checkpoint.pt", train("--netG", "{run}/checkpoint.pt"), {},
     ("error", "is a whole fastgan checkpoint: continue its run with --resume")),
    ("train --netG/--netD of two runs", train("--netG", "{run}/netG_epoch_0.pth", "--netD", "{other}/netD_epoch_0.pth"),
     {}, ("error", "come from different checkpoints")),
    ("train --netG/--netD of two steps", train("--netG", "{run}/netG_epoch_1.pth", "--netD", "{run}/netD_epoch_0.pth"),
     {}, ("error", "come from different checkpoints")),
    ("train --netD replaced by another run's", train("--netG", "{swapped}/netG_epoch_0.pth",
                                                     "--netD", "{swapped}/netD_epoch_0.pth"),
     {}, ("error", "is not the file")),
    ("train tutorial checkpoint as --netG", train("--netG", "{tutorial}"), {},
     ("ok", "the 'g_model_state_dict' entry of")),
    ("train --resume missing", train("--resume", "{missing}"), {}, ("error", "--resume {missing} does not exist")),
    ("train --resume empty folder", train("--resume", "{emptydir}"), {},
     ("error", "holds no whole fastgan checkpoint")),
    ("train --resume a weights file", train("--resume", "{run}/netG_epoch_0.pth"), {},
     ("error", "is not a fastgan checkpoint")),
    ("train --resume with --netG", train("--resume", "{run}", "--netG", "{run}/netG_epoch_0.pth"), {},
     ("error", "--resume takes G and D from the checkpoint")),
    ("train --resume at its end", ["train", "--resume", "{run}", "--max-steps", "6"], {},
     ("ok", "nothing to do: the run is at step 6")),
    ("train fresh run into another run's folder", train(outf="{run}"), {},
     ("error", "holds checkpoints this run would replace")),
    ("train into a folder a running run writes into", train(outf="{busy}"), {},
     ("error", "{busy} is in use by run busy00000000 (PID")),
    ("train --resume of a folder a running run writes into", ["train", "--resume", "{busy}", "--max-steps", "7"], {},
     ("error", "{busy} is in use by run busy00000000 (PID")),
    ("train --dry-run into a folder a running run writes into", train("--dry-run", outf="{busy}"), {},
     ("error", "{busy} is in use by run busy00000000 (PID")),
    ("train --dry-run into another run's folder", train("--dry-run", outf="{run}"), {},
     ("error", "holds checkpoints this run would replace")),
    ("train into a folder with a foreign checkpoint.pt", train(outf="{foreign}"), {},
     ("error", "checkpoint.pt (not a fastgan checkpoint); write into another folder with --outf DIR, or pass --force")),
    ("train resume an older epoch over later ones", ["train", "--resume", "{run}/train_state_epoch_0.pt",
                                                      "--max-steps", "5"], {},
     ("error", "this run, later: step 6")),
    ("train --resume past a damaged checkpoint.pt", ["train", "--resume", "{damaged}", "--max-steps", "7"], {},
     ("ok", "falling back to the newest whole epoch set")),
    ("train --resume, damaged checkpoint.pt and no epoch set", ["train", "--resume", "{damaged_alone}"], {},
     ("error", "holds no whole epoch set (train_state_epoch_N.pt with its netG/netD files) to fall back to; start a "
               "new run with --outf DIR")),
    ("train --resume a damaged checkpoint.pt file", ["train", "--resume", "{damaged_file}/checkpoint.pt"], {},
     ("error", "is not a readable checkpoint (RuntimeError: PytorchStreamReader failed reading zip archive: failed "
               "finding central directory); --resume {damaged_file} continues from the newest whole checkpoint")),
    ("train --resume a damaged checkpoint.pt file, no epoch set", ["train", "--resume",
                                                                   "{damaged_alone}/checkpoint.pt"], {},
     ("error", "holds no other whole checkpoint to continue; start a new run with --outf DIR")),
    ("train folder of 16-bit, float and transparent images", train("--dataset", "folder", "--dataroot", "{decode}",
                                                                   "--batchSize", "2"), CACHE,
     ("ok", "folder (3 images)")),
    ("train folder: unreadable files named once, with why", train("--dataset", "folder", "--dataroot", "{decode}",
                                                                  "--batchSize", "2"), CACHE,
     ("ok", "3 of 6 images under")),
    ("train folder with a link loop", train("--dataset", "folder", "--dataroot", "{loop}", "--batchSize", "2"), CACHE,
     ("ok", "folder (3 images)")),
    ("train folder of unreadable files", train("--dataset", "folder", "--dataroot", "{undecodable}"), CACHE,
     ("error", "none of the 2 images under --dataroot")),
    ("train --niter 0", train("--niter", "0"), {}, ("ok", "nothing to do")),
    ("train --sync-bn in one process", train("--sync-bn", "--max-steps", "0"), {}, ("ok", "--sync-bn has no effect")),
    # sample
    ("sample --n 0 --eval", ["sample", "--netG", "{G}", "--n", "0", "--eval", "--out", "{new}/s.png"], {},
     ("error", "argument --n: expected an integer >= 1, got 0")),
    ("sample --n 1", ["sample", "--netG", "{G}", "--n", "1", "--out", "{new}/s.png"], {},
     ("error", "needs 2 or more images, got 1; ask for more, or pass --eval")),
    ("sample --nrow 0", ["sample", "--netG", "{G}", "--nrow", "0"], {}, ("error", "argument --nrow")),
    ("sample --seed -1", ["sample", "--netG", "{G}", "--seed", "-1"], {}, ("error", "argument --seed")),
    ("sample --nz 0", ["sample", "--netG", "{G}", "--nz", "0"], {}, ("error", "argument --nz")),
    ("sample --out .xyz", ["sample", "--netG", "{G}", "--out", "{new}/grid.xyz"], {},
     ("error", "pillow cannot write .xyz")),
    ("sample --out without extension", ["sample", "--netG", "{G}", "--out", "{new}/grid"], {},
     ("error", "pillow cannot write a file without an extension")),
    ("sample --out under a file", ["sample", "--netG", "{G}", "--out", "{afile}/grid.png"], {},
     ("error", "cannot write into")),
    ("sample --out a folder", ["sample", "--netG", "{G}", "--out", "{pngdir}"], {}, ("error", "is a folder")),
    ("sample --device cuda", ["sample", "--netG", "{G}", "--device", "cuda"], {}, ("error", "no CUDA device")),
    ("sample FASTGAN_BACKEND=bogus", ["sample", "--netG", "{G}", "--out", "{new}/s.png"],
     {"FASTGAN_BACKEND": "bogus"}, ("error", "the environment variable FASTGAN_BACKEND")),
    ("sample --netG missing", ["sample", "--netG", "{missing}"], {}, ("error", "does not exist")),
    ("sample --netG train_state", ["sample", "--netG", "{run}/train_state_epoch_0.pt", "--out", "{new}/s.png"], {},
     ("error", "is a fastgan train_state file")),
    ("sample --netG optimizer state", ["sample", "--netG", "{optimizer}", "--out", "{new}/s.png"], {},
     ("error", "an optimizer state_dict")),
    ("sample --netG pickled module", ["sample", "--netG", "{module}", "--out", "{new}/s.png"], {},
     ("error", "holds pickled Python objects")),
    ("sample --netG no tensors", ["sample", "--netG", "{epoch_only}", "--out", "{new}/s.png"], {},
     ("error", "holds no state_dict")),
    ("sample --netG a discriminator", ["sample", "--netG", "{run}/netD_epoch_0.pth", "--out", "{new}/s.png"], {},
     ("error", "fit no preset generator")),
    ("sample --preset mnist28 on dcgan64", ["sample", "--netG", "{G}", "--preset", "mnist28", "--out", "{new}/s.png"],
     {}, ("error", "missing keys")),
    ("sample the tutorial's checkpoint", ["sample", "--netG", "{tutorial}", "--n", "4", "--out", "{new}/s.png"], {},
     ("ok", "using the 'g_model_state_dict' entry")),
    ("sample {'state_dict': ...}", ["sample", "--netG", "{nested}", "--n", "4", "--out", "{new}/s.png"], {},
     ("ok", "using the 'state_dict' entry")),
    ("sample {'generator': ...}", ["sample", "--netG", "{generator}", "--n", "4", "--out", "{new}/s.png"], {},
     ("ok", "using the 'generator' entry")),
    ("sample {'model': ...}", ["sample", "--netG", "{model}", "--n", "4", "--out", "{new}/s.png"], {},
     ("ok", "using the 'model' entry")),
    ("sample torch.compile keys", ["sample", "--netG", "{compiled}", "--n", "4", "--out", "{new}/s.png"], {},
     ("ok", "4 samples")),
    ("sample checkpoint.pt", ["sample", "--netG", "{run}/checkpoint.pt", "--n", "4", "--out", "{new}/s.png"], {},
     ("ok", "using the 'netG' entry")),
    ("sample .jpg", ["sample", "--netG", "{G}", "--n", "2", "--out", "{new}/s.jpg"], {}, ("ok", "2 samples")),
    ("sample --n 100000000", ["sample", "--netG", "{G}", "--n", "100000000", "--out", "{new}/s.png"], {},
     ("error", "--n 100000000: a grid of 100000000 64x64 images is 530x825000002 pixels and needs")),
    ("sample a JPEG taller than JPEG allows", ["sample", "--netG", "{G}", "--n", "10000", "--out", "{new}/s.jpg"], {},
     ("error", "pillow writes JPEG images of at most 65500x65500: ask for fewer images, or for more than 8 a row")),
    ("sample --netG a pickle that would run code", ["sample", "--netG", "{planted}", "--out", "{new}/s.png"], {},
     ("error", "holds pickled Python objects, not just tensors")),
    # interpolate
    ("interpolate --steps 0 --eval", ["interpolate", "--netG", "{G}", "--steps", "0", "--eval"], {},
     ("error", "argument --steps: expected an integer >= 1, got 0")),
    ("interpolate --steps 1 --eval", ["interpolate", "--netG", "{G}", "--steps", "1", "--eval",
                                      "--out", "{new}/w.png"], {}, ("ok", "1 frames from seed 0 to seed 1")),
    ("interpolate --steps 1", ["interpolate", "--netG", "{G}", "--steps", "1", "--out", "{new}/w.png"], {},
     ("error", "needs 2 or more images, got 1")),
    ("interpolate one seed", ["interpolate", "--netG", "{G}", "--seeds", "3"], {},
     ("error", "argument --seeds: expected 2 arguments")),
    ("interpolate --nrow 0", ["interpolate", "--netG", "{G}", "--nrow", "0"], {}, ("error", "argument --nrow")),
    ("interpolate --out .txt", ["interpolate", "--netG", "{G}", "--out", "{new}/walk.txt"], {},
     ("error", "pillow cannot write .txt")),
    ("interpolate --mode cubic", ["interpolate", "--netG", "{G}", "--mode", "cubic"], {},
     ("error", "argument --mode: invalid choice")),
    ("interpolate --netG train_state", ["interpolate", "--netG", "{run}/train_state_epoch_1.pt",
                                        "--out", "{new}/w.png"], {}, ("error", "is a fastgan train_state file")),
    ("interpolate --steps 100000000", ["interpolate", "--netG", "{G}", "--steps", "100000000", "--out", "{new}/w.png"],
     {}, ("error", "ask for fewer images, or for fewer than 100000000 a row (--nrow)")),
    ("interpolate the tutorial's checkpoint", ["interpolate", "--netG", "{tutorial}", "--steps", "3",
                                               "--out", "{new}/w.png"], {}, ("ok", "3 frames")),
    # demo
    ("demo --backend triton on CPU", ["demo", "--backend", "triton", "--device", "cpu"], NO_INTERPRETER,
     ("error", "backend='triton' cannot run here")),
    ("demo FASTGAN_BACKEND=triton on CPU", ["demo", "--device", "cpu"], {"FASTGAN_BACKEND": "triton", **NO_INTERPRETER},
     ("error", "FASTGAN_BACKEND=triton (set in the environment)")),
    ("demo --batch 1", ["demo", "--batch", "1"], {}, ("error", "argument --batch: expected an integer >= 2")),
    ("demo --steps 0", ["demo", "--steps", "0"], {}, ("error", "argument --steps")),
    ("demo --ngf 0", ["demo", "--ngf", "0"], {}, ("error", "argument --ngf")),
    ("demo --device cuda", ["demo", "--device", "cuda"], {}, ("error", "no CUDA device")),
    ("demo --device cpu:x", ["demo", "--device", "cpu:x"], {}, ("error", "--device cpu:x")),
    # bench, profile, build-ext, the command line itself
    ("bench --batch 1", ["bench", "--batch", "1"], {}, ("error", "--batch must be at least 2")),
    ("bench --steps 0", ["bench", "--steps", "0"], {}, ("error", "argument --steps")),
    ("bench --ngf 0", ["bench", "--ngf", "0"], {}, ("error", "argument --ngf")),
    ("bench --device cuda", ["bench", "--device", "cuda"], {}, ("error", "no CUDA device")),
    ("bench --backends tpu", ["bench", "--backends", "tpu"], {}, ("error", "unknown ['tpu']")),
    ("bench --peak-tflops -1", ["bench", "--peak-tflops", "-1"], {}, ("error", "argument --peak-tflops")),
    ("bench --markdown under a file", ["bench", "--batch", "2", "--markdown", "{afile}/r.md"], {},
     ("error", "is a file, not a folder")),
    ("profile --warmup -1", ["profile", "--warmup", "-1"], {}, ("error", "argument --warmup")),
    ("profile --trace-dir a file", ["profile", "--batch", "2", "--trace-dir", "{afile}", "--device", "cpu"], {},
     ("error", "is a file, not a folder")),
    ("build-ext unwritable cache", ["build-ext"], {"FASTGAN_CACHE_DIR": "{afile}/cache"},
     ("error", "is not a writable folder")),
    ("no command", [], {}, ("error", "fastgan: error: no command given; run one of them")),
    ("misspelt command", ["trian"], {}, ("error", "argument COMMAND: invalid choice: 'trian'")),
    ("unknown flag", train("--learning-rate", "1"), {},
     ("error", "fastgan train: error: unrecognized arguments: --learning-rate 1")),
    ("flag without its value", ["train", "--lr"], {}, ("error", "argument --lr: expected one argument")),
]


def make_fixtures(root):
    """The files the probes name, under ``root``; returns {name: path}.  Uses the fastgan being tested."""
    import torch
    from torch import nn

    from fastgan import cli
    from fastgan.nn import reference

    paths = {name: os.path.join(root, name) for name in ("run", "other", "swapped", "emptydir", "pngdir", "scratch")}
    tiny = ["--batchSize", "4", "--ngf", "4", "--ndf", "4", "--builtin-images", "16", "--device", "cpu"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli.main(["train", "--outf", paths["run"], "--manualSeed", "1", "--max-steps", "6", *tiny])
        cli.main(["train", "--outf", paths["other"], "--manualSeed", "2", "--max-steps", "2", *tiny])
    shutil.copytree(paths["run"], paths["swapped"])  # then its netD replaced by another run's
    shutil.copy(os.path.join(paths["other"], "netD_epoch_0.pth"), os.path.join(paths["swapped"], "netD_epoch_0.pth"))
    os.makedirs(paths["emptydir"])
    os.makedirs(paths["scratch"])
    os.makedirs(os.path.join(paths["pngdir"], "grid.png"))
    paths["pngdir"] = os.path.join(paths["pngdir"], "grid.png")
    paths["G"] = os.path.join(paths["run"], "netG_epoch_1.pth")
    torch.manual_seed(0)
    G, D = reference.Generator(ngf=4), reference.Discriminator(ndf=4)
    data_parallel = {f"module.{k}": v for k, v in G.state_dict().items()}
    files = {
        "tutorial": {"g_model_state_dict": data_parallel, "epoch": 5,
                     "d_model_state_dict": {f"module.{k}": v for k, v in D.state_dict().items()}},
        "nested": {"state_dict": G.state_dict(), "epoch": 1},
        "generator": {"generator": G.state_dict(), "discriminator": D.state_dict()},
        "model": {"model": G.state_dict()},
        "compiled": {f"_orig_mod.{k}": v for k, v in G.state_dict().items()},
        "optimizer": torch.optim.Adam(G.parameters()).state_dict(),
        "epoch_only": {"epoch": 3},
        "module": nn.Linear(2, 2),
    }
    paths["planted"] = os.path.join(root, "planted.pth")
    for name, obj in files.items():
        paths[name] = os.path.join(root, f"{name}.pth")
        torch.save(obj, paths[name])
    torch.save({"main.0.weight": torch.ones(1), "hook": _Planted(os.path.join(root, "ran"))}, paths["planted"])
    _image_folders(root, paths)
    for name in ("damaged", "damaged_alone", "damaged_file"):  # copies of a run whose checkpoint.pt is cut short
        paths[name] = os.path.join(root, name)
        shutil.copytree(paths["run"], paths[name])
        with open(os.path.join(paths[name], "checkpoint.pt"), "r+b") as f:
            f.truncate(1000)
    for name in os.listdir(paths["damaged_alone"]):
        if "_epoch_" in name:
            os.remove(os.path.join(paths["damaged_alone"], name))
    for name, content in (("junk", "junk"), ("empty", ""), ("afile", "a file")):
        paths[name] = os.path.join(root, f"{name}.pth" if name != "afile" else name)
        with open(paths[name], "w") as f:
            f.write(content)
    paths["missing"] = os.path.join(root, "missing.pth")
    paths["foreign"] = os.path.join(root, "foreign")
    os.makedirs(paths["foreign"])
    torch.save({"model": G.state_dict()}, os.path.join(paths["foreign"], "checkpoint.pt"))
    paths["busy"] = os.path.join(root, "busy")
    shutil.copytree(paths["run"], paths["busy"])
    hold_busy(paths)
    return paths


BUSY_LOCK = ".fastgan-train.lock"  # fastgan.cli.lock.LOCK_FILE, spelt out: an older fastgan has no lock to import
_held = {}


def hold_busy(paths):
    """Lock {busy} as a running `fastgan train` would (flock on its lock file, which names the run), for as long as
    this process lives: the probes into it meet a run that is writing there."""
    import fcntl
    import json

    if paths["busy"] not in _held:
        f = open(os.path.join(paths["busy"], BUSY_LOCK), "w")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write(json.dumps(dict(pid=os.getpid(), run_id="busy00000000", host=__import__("socket").gethostname(),
                                started="now")) + "\n")
        f.flush()
        _held[paths["busy"]] = f


class _Planted:
    """A pickle that would make a folder (the probes' "ran") if it were ever unpickled."""

    def __init__(self, folder):
        self.folder = folder

    def __reduce__(self):
        return os.makedirs, (self.folder,)


def _image_folders(root, paths):
    """decode: a 16-bit PNG, a float TIFF and a transparent PNG, with three files that do not decode (floats out of
    [0, 1], a broken JPEG, a decompression bomb); loop: three images and a link back up the tree; undecodable:
    two files that do not decode."""
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    def png_header(width, height):  # a 1-bit PNG without its pixels: what PIL reads when it opens one
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                + chunk(b"IDAT", b"") + chunk(b"IEND", b""))

    for name in ("decode", "loop", "undecodable"):
        paths[name] = os.path.join(root, name)
        os.makedirs(os.path.join(paths[name], "sub"))
    decode = paths["decode"]
    Image.fromarray(np.full((40, 40), 32768, np.uint16)).save(os.path.join(decode, "a.png"))
    Image.fromarray(np.full((40, 40), 0.5, np.float32)).save(os.path.join(decode, "b.tif"))
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(os.path.join(decode, "c.png"))
    Image.fromarray(np.full((40, 40), 3.0, np.float32)).save(os.path.join(decode, "d.tif"))
    for folder in (decode, paths["undecodable"]):
        with open(os.path.join(folder, "sub", "broken.jpg"), "wb") as f:
            f.write(b"\xff\xd8 not a jpeg")
        with open(os.path.join(folder, "sub", "bomb.png"), "wb") as f:
            f.write(png_header(13500, 13500))
    for i in range(3):
        Image.new("RGB", (40, 40), (80 * i, 0, 0)).save(os.path.join(paths["loop"], "sub", f"{i}.png"))
    os.symlink(paths["loop"], os.path.join(paths["loop"], "sub", "loop"))


def expand(argv, paths, new):
    return [arg.format(**paths, new=new) for arg in argv]


@contextlib.contextmanager
def environment(env):
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_probe(main, argv, env, paths):
    """(kind, text) of ``main(argv)``: kind "error" (exit status != 0 with a one-line message, no traceback),
    "multi-line error", "traceback" (an exception escaped, or stderr shows one) or "ok" (exit status 0);
    text: the message, or the output."""
    out, err = io.StringIO(), io.StringIO()
    argv = expand(argv, paths, tempfile.mkdtemp(dir=paths["scratch"]))
    env = {k: v.format(**paths) for k, v in env.items()}
    code, escaped = 0, None
    with environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv) or 0
        except SystemExit as exc:
            code = exc.code if exc.code is not None else 0
        except BaseException:  # noqa: BLE001 - what an older fastgan let escape
            escaped = traceback.format_exc()
    stderr = err.getvalue()
    if escaped or "Traceback (most recent call last)" in stderr:
        return "traceback", escaped or stderr
    if code == 0:
        return "ok", out.getvalue() + stderr
    if isinstance(code, str):
        return ("error" if len(code.strip().splitlines()) == 1 else "multi-line error"), code
    lines = [line for line in stderr.splitlines() if line.strip()]
    return "error", lines[-1] if lines else f"exit status {code}, no message"


class _TooLong(BaseException):  # not caught by an "except Exception" that keeps going
    pass


def _too_long(signum, frame):
    raise _TooLong


if __name__ == "__main__":  # the tally: python cli_probes.py FIXTURES_DIR (with the fastgan to judge on PYTHONPATH;
    # a second tally, of an older fastgan, reuses the fixtures the first one made)
    import json
    import signal

    from fastgan import cli

    root, saved = sys.argv[1], os.path.join(sys.argv[1], "paths.json")
    if os.path.exists(saved):  # fixtures an earlier tally made (with the fastgan whose files the probes name)
        with open(saved) as f:
            paths = json.load(f)
    else:
        paths = make_fixtures(root)
        with open(saved, "w") as f:
            json.dump(paths, f)
    hold_busy(paths)
    signal.signal(signal.SIGALRM, _too_long)
    tally = {}
    for name, argv, env, (kind, text) in PROBES:
        signal.alarm(30)  # an older fastgan ran some of these (a whole benchmark) instead of refusing them
        got, message = run_probe(cli.main, argv, env, paths)
        signal.alarm(0)
        if got == "traceback" and "_TooLong" in message:
            got, message = "ok", "still running after 30 s: the bad value was taken"
        if kind == "error":
            verdict = "clear error" if got == "error" else "silent (exit 0)" if got == "ok" else got
        elif got == "ok":  # it must also say what the probe expects (a count, a fallback): else it went wrong silently
            verdict = "correct" if text.format(**paths) in message else "silent (wrong result)"
        else:
            verdict = got
        tally[verdict] = tally.get(verdict, 0) + 1
        print(f"{verdict:16} {name}: {' '.join(message.split())[:200]}", flush=True)
    print(json.dumps(tally))
