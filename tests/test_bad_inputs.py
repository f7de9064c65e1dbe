"""Every class of bad input, through the real command line: exit status 2, one line on stderr that
names the problem, no traceback, and nothing on disk changed (not even a temporary file left).

Each row is (command line, what the error line must say). Placeholders in braces are files of the
``world`` folder below: a good checkpoint and bundle, broken copies of them, a user's own folder of
documents, a previous quickstart, configs that are wrong in one way each. Bundle rows are also run
through the bundle's own torch-free ``verify.py``, which must refuse with the same message.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robustedge.cli import main

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
EVAL = ["eval", "{ckpt}", "--n", "16", "--attacks", "clean", "--device", "cpu", "--no-progress", "--out", "{new}"]
EXPORT = ["export", "{ckpt}", "--n", "16", "--calibration-n", "16", "--square-n", "0", "--transfer-attacks", "pgd20"]
TRAIN = ["train", "--config", "digits_teacher_clean", "--out-dir", "{new}", "--device", "cpu", "--no-progress"]
DISTILL = ["distill", "--config", "digits_student_bmtard", "--out-dir", "{new}", "--device", "cpu"]
QUICKSTART = ["quickstart", "--out", "{quickstart}", "--no-progress"]

CASES = [
    # --- eval: numbers, names, files, devices, models that give NaN ---------------------------
    (EVAL + ["--aa-batch-size", "-2"], "--aa-batch-size must be an integer >= 1, got -2"),
    (EVAL + ["--aa-batch-size", "0"], "--aa-batch-size must be an integer >= 1, got 0"),
    (EVAL + ["--batch-size", "0"], "--batch-size must be an integer >= 1 or 'auto', got '0'"),
    (EVAL + ["--batch-size", "many"], "--batch-size must be an integer >= 1 or 'auto', got 'many'"),
    (EVAL + ["--n", "-3"], "--n must be an integer >= 0, got -3"),
    (EVAL + ["--n", "ten"], "--n must be an integer, got 'ten'"),
    (EVAL + ["--eps", "2"], "--eps must be in [0, 1], got 2"),
    (EVAL + ["--eps", "-0.1"], "--eps must be in [0, 1], got -0.1"),
    (EVAL + ["--eps", "nan"], "--eps must be a finite number, got 'nan'"),
    (EVAL + ["--eps", "inf"], "--eps must be a finite number, got 'inf'"),
    (EVAL + ["--eps", "8/0"], "--eps must be a number (e.g. 0.1 or 8/255), got '8/0'"),
    (EVAL + ["--eps", "abc"], "--eps must be a number (e.g. 0.1 or 8/255), got 'abc'"),
    (EVAL + ["--attacks", "clean,pgd7"], "unknown attack 'pgd7'; valid attacks:"),
    (EVAL + ["--attacks", ","], "no attacks given"),
    (EVAL + ["--dataset", "mnist"], "unknown dataset 'mnist'; valid datasets:"),
    (EVAL + ["--dataset", "cifar10"], "dataset 'cifar10' needs --data-root"),
    (EVAL + ["--device", "foo"], "unknown device 'foo'"),
    pytest.param(EVAL + ["--device", "cuda"], "CUDA is not available", marks=NO_CUDA),
    (EVAL + ["--split", "foo"], "argument --split: invalid choice: 'foo'"),
    (EVAL + ["--seed", "-1"], "--seed must be an integer in [0, 2147483647], got -1"),
    (EVAL + ["--flags-n", "0"], "--flags-n must be an integer >= 1, got 0"),
    (EVAL + ["--seed", "x"], "--seed must be an integer, got 'x'"),
    (EVAL[:-1] + ["{file}"], "is an existing file, not a folder"),
    (EVAL[:-1] + ["{foreign_eval}"], "eval.json exists and was not written by RobustEdge"),
    (["eval", "{missing}"], "checkpoint not found"),
    (["eval", "{truncated}"], "truncated or corrupt"),
    (["eval", "{pickle}"], "not a readable safetensors file"),
    (["eval", "{docs}"], "checkpoint is not a file"),
    (["eval", "{foreign_safetensors}"], "is a safetensors file but not a RobustEdge model"),
    (["eval", "{bad_meta}"], "malformed RobustEdge metadata"),
    ([a if a != "{ckpt}" else "{nan_ckpt}" for a in EVAL], "non-finite (NaN/Inf) weights in fc.bias"),
    ([a if a != "{ckpt}" else "{inf_ckpt}" for a in EVAL], "non-finite (NaN/Inf) weights in fc.bias"),
    ([a if a != "{ckpt}" else "{nan_logits}" for a in EVAL], "non-finite logits (NaN/Inf)"),
    # --- the model's input contract: its weights, its normalisation, its metadata ------------------
    (["eval", "{int_pth}", "--arch", "wideresnet-10-1", "--dataset", "digits"], "weights of the wrong kind: "),
    (["eval", "{state_pth}", "--arch", "wideresnet-10-1", "--dataset", "digits", "--mean", "0.5,0.5", "--std",
      "0.2,0.2"], "--mean/--std have 2 values but the model takes 1 input channel"),
    (["eval", "{state_pth}", "--arch", "wideresnet-10-1", "--dataset", "digits", "--mean", "0.5", "--std", "0"],
     "--std must be > 0 for every channel"),
    (["eval", "{state_pth}", "--arch", "wideresnet-10-1", "--dataset", "digits", "--mean", "0.5", "--std", "-1"],
     "--std must be > 0 for every channel"),
    (["eval", "{state_pth}", "--arch", "wideresnet-10-1", "--mean", "0.5,0.5", "--std", "1"],
     "--mean has 2 values and --std 1"),
    (["eval", "{norm_meta}"], "one value per input channel"),
    (["eval", "{eps_meta}"], "eps must be a number in [0, 1], got 2"),
    (["eval", "{qat_meta}"], "malformed QAT metadata (activations 'uint8', patterns 'somewhere')"),
    (["import", "{nan_pth}", "--arch", "wideresnet-10-1", "--dataset", "digits", "--out",
      "{world}/imported.safetensors"], "non-finite (NaN/Inf) weights"),
    (["app", "--model", "{nan_ckpt}"], "non-finite (NaN/Inf) weights"),
    (["app", "--model", "{ckpt}", "--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' cannot be resolved"),
    (TRAIN + ["--qat-from", "{nan_ckpt}"], "non-finite (NaN/Inf) weights"),
    (["eval"], "the following arguments are required: checkpoint"),
    # --- foreign models (state dicts with --arch, RobustBench) and `robustedge import` -----------
    (["eval", "{state_pth}"], "is not a RobustEdge checkpoint: pass --arch"),
    (["eval", "{state_pth}", "--arch", "resnet99"], "unknown model 'resnet99'"),
    (["eval", "{state_pth}", "--arch", "resnet20", "--dataset", "digits"], "does not fit architecture 'resnet20'"),
    (["eval", "{state_pth}", "--arch", "wideresnet-10-1", "--dataset", "imagefolder"], "has no standard shape"),
    (["eval", "{state_pth}", "--arch", "wideresnet-10-1", "--mean", "0.5"], "--mean and --std must be given together"),
    (["eval", "{state_pth}", "--arch", "wideresnet-10-1", "--mean", "x", "--std", "1"], "--mean must be a number"),
    (["eval", "{state_pth}", "--arch", "wideresnet-10-1", "--num-classes", "1"], "--num-classes must be an integer >= 2"),
    (["eval", "{state_pth}", "--arch", "wideresnet-10-1", "--image-size", "4"], "--image-size must be an integer >= 8"),
    (["eval", "{state_pth}", "--arch", "wideresnet-10-1", "--width", "0"], "--width must be > 0, got 0"),
    (["eval", "{file}", "--arch", "resnet20"], "not a weights-only torch checkpoint"),
    pytest.param(["eval", "robustbench:Carmon2019Unlabeled"], "needs the RobustBench package",
                 marks=pytest.mark.skipif(bool(__import__("importlib").util.find_spec("robustbench")),
                                          reason="RobustBench is installed: the row would download")),
    (EVAL + ["--num-examples", "-1"], "--n must be an integer >= 0, got -1"),
    (["import", "{state_pth}", "--out", "{world}/imported.safetensors"], "import needs a state dict file and --arch"),
    (["import", "{state_pth}", "--arch", "wideresnet-10-1", "--dataset", "digits", "--out", "{ckpt}"],
     "exists; choose another --out"),
    (["import", "{state_pth}", "--arch", "wideresnet-10-1", "--out", "{world}/imported.pt"],
     "--out must end in .safetensors"),
    (["import", "{state_pth}", "--arch", "wideresnet-10-1", "--out", "{docs}/sub/imported.safetensors"],
     "folder {docs}/sub does not exist"),
    (["import", "{ckpt}", "--arch", "wideresnet-10-1", "--out", "{world}/imported.safetensors"],
     "is already a RobustEdge checkpoint"),
    (["import", "{missing}", "--arch", "wideresnet-10-1", "--out", "{world}/imported.safetensors"],
     "checkpoint not found"),
    (["import", "{state_pth}", "--arch", "resnet20", "--dataset", "digits", "--out", "{world}/imported.safetensors"],
     "does not fit architecture 'resnet20'"),
    (["import", "{state_pth}"], "the following arguments are required: --out"),
    (["export", "{state_pth}", "--out", "{new}"],
     "is not a RobustEdge checkpoint: pass --arch"),
    # --- export: output folders that are not ours, numbers, names -------------------------------
    (EXPORT + ["--out", "{new}", "--formats", "onnx,tflite"], "unknown export format 'tflite'"),
    (EXPORT + ["--out", "{new}", "--formats", ","], "unknown export format ''"),
    (EXPORT + ["--out", "{docs}"], "is not empty and is not a RobustEdge export bundle"),
    (EXPORT + ["--out", "{docs}", "--force"], "is not empty and is not a RobustEdge export bundle"),
    (EXPORT + ["--out", "{world}", "--force"], "contains"),
    (["export", "{ckpt_in_bundle}", "--out", "{bundle_with_ckpt}", "--force"], "an input of this command"),
    (EXPORT + ["--out", "{file}"], "is an existing file, not a folder"),
    (EXPORT + ["--out", "{file}", "--force"], "is an existing file, not a folder"),
    (EXPORT + ["--out", "{bundle}"], "already holds a RobustEdge export bundle; pass --force"),
    (EXPORT + ["--out", "{new}", "--n", "0"], "--n must be an integer >= 1, got 0"),
    (EXPORT + ["--out", "{new}", "--calibration-n", "0"], "--calibration-n must be an integer >= 1, got 0"),
    (EXPORT + ["--out", "{new}", "--square-n", "-1"], "--square-n must be an integer >= 0, got -1"),
    (EXPORT + ["--out", "{new}", "--square-queries", "0"], "--square-queries must be an integer >= 1, got 0"),
    (EXPORT + ["--out", "{new}", "--max-drop", "5"], "--max-drop must be in [0, 1], got 5"),
    (EXPORT + ["--out", "{new}", "--max-drop", "-0.1"], "--max-drop must be in [0, 1], got -0.1"),
    (EXPORT + ["--out", "{new}", "--min-agreement", "1.5"], "--min-agreement must be in [0, 1], got 1.5"),
    (EXPORT + ["--out", "{new}", "--max-drop", "nan"], "--max-drop must be a finite number"),
    (EXPORT + ["--out", "{new}", "--transfer-attacks", "foo"], "unknown transfer attack 'foo'"),
    (EXPORT + ["--out", "{new}", "--whitebox-attacks", "laser"], "unknown white-box attack 'laser'"),
    (EXPORT + ["--out", "{new}", "--flags-n", "0"], "--flags-n must be an integer >= 1, got 0"),
    (EXPORT + ["--out", "{new}", "--calibration-method", "foo"], "argument --calibration-method: invalid choice"),
    (EXPORT + ["--out", "{new}", "--seed", "x"], "--seed must be an integer, got 'x'"),
    (["export", "{nan_ckpt}", "--out", "{new}"], "non-finite (NaN/Inf) weights in fc.bias"),
    (["export", "{nan_logits}", "--out", "{new}"], "non-finite logits (NaN/Inf)"),
    (["export", "{ckpt}"], "the following arguments are required: --out"),
    # a QAT student exports only the INT8 formats whose runtime runs its scheme
    (["export", "{qat_ckpt}", "--out", "{new}", "--formats", "executorch-int8"],
     "train the QAT student with --qat-activations int8"),
    (["export", "{qat_ckpt}", "--out", "{new}", "--formats", "trt-int8"], "TensorRT takes zero points of 0 only"),
    # --- the environment: a leading NAME=value is set for the row --------------------------------
    (["ROBUSTEDGE_PT2E_FAST=maybe", "export", "{qat_ckpt}", "--out", "{new}", "--formats", "onnx-int8"],
     "ROBUSTEDGE_PT2E_FAST must be 0 (torchao's own path) or 1 (the fast paths), got 'maybe'"),
    (["ROBUSTEDGE_PT2E_FAST=yes", "train", "--config", "digits_teacher_clean", "--qat", "--out-dir", "{new}",
      "--device", "cpu", "--no-progress"], "ROBUSTEDGE_PT2E_FAST must be 0"),
    (["ROBUSTEDGE_CACHE={file}", *EXPORT, "--out", "{new}", "--emulate", "arm64"], "($ROBUSTEDGE_CACHE) is not a folder"),
    (["ROBUSTEDGE_CACHE={file}/sub", "verify", "{bundle}", "--emulate", "arm64"], "($ROBUSTEDGE_CACHE) is not a folder"),
    # --- replays on other processors -------------------------------------------------------------
    (EXPORT + ["--out", "{new}", "--emulate", "sparc"], "unknown emulated processor 'sparc'; known: arm64"),
    (["verify", "{bundle}", "--emulate", "sparc"], "unknown emulated processor 'sparc'; known: arm64"),
    (["verify", "{bundle}", "--emulate", ""], "emulate must name processor families (arm64) or none, got ''"),
    (["export", "{qat_ckpt}", "--out", "{new}", "--formats", "onnx,onnx-fp16"], "a QAT student exports to"),
    # --- verify: bundles that are not what their manifest says ----------------------------------
    (["verify", "{world}"], "is not an export bundle (no manifest.json)"),
    (["verify", "{file}"], "is not an export bundle (not a folder)"),
    (["verify", "{b_badjson}"], "manifest.json is not valid JSON"),
    (["verify", "{b_list}"], "manifest.json: must be a JSON object"),
    (["verify", "{b_nofiles}"], "missing required key 'files'"),
    (["verify", "{b_escape}"], "'files.onnx.file' must be a plain file name inside the bundle, got '../outside.onnx'"),
    (["verify", "{b_absolute}"], "must be a plain file name inside the bundle"),
    (["verify", "{b_symlink}"], "points outside the bundle"),
    (["verify", "{b_unknown_format}"], "unknown format 'tflite' in 'files'"),
    (["verify", "{b_unknown_gate}"], "unknown gate key 'max_drop_typo'"),
    (["verify", "{b_gate_range}"], "gate 'min_agreement' must be a fraction in [0, 1], got 7"),
    (["verify", "{b_eps_string}"], "'eps' must be a number in [0, 1], got 'abc'"),
    (["verify", "{b_eps_nan}"], "non-finite number NaN"),
    (["verify", "{b_table_string}"], "'table.torch.clean' must be a finite number or null"),
    (["verify", "{b_bad_flag}"], "'flags.onnx' must be a list of {check, examples, of, detail} objects"),
    (["verify", "{b_square_count}"], "'samples.square.onnx' must be a count in [1, samples.n]"),
    (["verify", "{b_whitebox_format}"], "'samples.whitebox.tflite' must be a list of attack names of a format"),
    (["verify", "{b_npz_object}"], "verify.npz is not a readable numpy archive without objects"),
    (["verify", "{b_npz_missing}"], "verify.npz does not match the manifest: missing torch_pred"),
    (["verify", "{b_npz_shape}"], "verify.npz: 'x' must be float32 images in [0, 1] of shape (16, 1, 16, 16)"),
    (["verify", "{b_npz_labels}"], "verify.npz: 'y' must be int64 class indices"),
    (["verify", "{b_tampered}"], "model.int8.onnx does not match its manifest sha256"),
    (["verify", "{b_missing_file}"], "bundle file missing"),
    (["verify", "{b_deep}"], "manifest.json is not a manifest: nested too deeply to read"),
    (["verify", "{bundle}", "--out", "{md_dir}"], "verify.md exists and was not written by RobustEdge"),
    (["verify", "{bundle}", "--out", "{bundle}/report"], "is inside the bundle"),
    (["verify", "{bundle}", "--out", "{bundle}"], "is inside the bundle"),
    (["verify", "{bundle}", "--square-n", "-1"], "--square-n must be an integer >= 0, got -1"),
    (["verify", "{bundle}", "--max-drop", "2"], "--max-drop must be in [0, 1], got 2"),
    # --- train / distill: config values of the wrong type or range ------------------------------
    (TRAIN + ["--set", "epochs=abc"], "config key 'epochs' expects an integer, got 'abc'"),
    (TRAIN + ["--set", "optim.lr=fast"], "config key 'optim.lr' expects a number, got 'fast'"),
    (TRAIN + ["--set", "optim.milestones=abc"], "config key 'optim.milestones' expects a list of integers, got 'abc'"),
    (TRAIN + ["--set", "optim.milestones=[1,x]"], "config key 'optim.milestones[1]' expects an integer, got 'x'"),
    (TRAIN + ["--set", "channels_last=maybe"], "config key 'channels_last' expects a boolean"),
    (["train", "--config", "{yaml_ten}", "--out-dir", "{new}"], "config key 'epochs' expects an integer, got 'ten'"),
    (["train", "--config", "{binary}", "--out-dir", "{new}"], "is not a YAML text file"),
    (["train", "--config", "{yaml_list}", "--out-dir", "{new}"], "config 'top level' must be a mapping, got list"),
    (["train", "--config", "{yaml_invalid}", "--out-dir", "{new}"], "is not valid YAML"),
    (["train", "--config", "{docs}"], "config {docs} is not a file"),
    (["train", "--config", "no_such_recipe"], "config file not found: no_such_recipe"),
    (TRAIN + ["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (TRAIN + ["--epochs", "-1"], "--epochs must be an integer >= 1, got -1"),
    (TRAIN + ["--lr", "-0.1"], "--lr must be > 0, got -0.1"),
    (TRAIN + ["--lr", "nan"], "--lr must be a finite number"),
    (TRAIN + ["--eps", "2"], "--eps must be in [0, 1], got 2"),
    (TRAIN + ["--eps", "8/0"], "--eps must be a number (e.g. 0.1 or 8/255)"),
    (TRAIN + ["--step-size", "0"], "--step-size must be > 0, got 0"),
    (TRAIN + ["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (TRAIN + ["--width", "-1"], "--width must be > 0, got -1"),
    (TRAIN + ["--set", "eval_n=-1"], "config key 'eval_n' (0 turns validation off) must be an integer >= 0, got -1"),
    (TRAIN + ["--set", "eval_eps=2"], "config key 'eval_eps' must be in [0, 1], got 2"),
    (TRAIN + ["--set", "attack.step_size=0", "--method", "pgd_at"], "config key 'attack.step_size' must be > 0, got 0"),
    (TRAIN + ["--set", "data.val_fraction=1.5"], "config key 'data.val_fraction' must be in [0, 1), got 1.5"),
    (TRAIN + ["--set", "data.train_n=0"], "config key 'data.train_n' must be an integer >= 1, got 0"),
    (TRAIN + ["--set", "data.train_n=many"], "config key 'data.train_n' expects an integer or null, got 'many'"),
    (TRAIN + ["--set", "data.train_n=2.5"], "config key 'data.train_n' expects an integer or null, got 2.5"),
    (TRAIN + ["--set", "data.train_n=true"], "config key 'data.train_n' expects an integer or null, got True"),
    (TRAIN + ["--method", "trades", "--set", "method_args.beta=six"], "config key 'method_args.beta' must be a number"),
    (TRAIN + ["--method", "trades", "--set", "method_args.betta=6"], "has no argument(s) betta; valid: beta"),
    (TRAIN + ["--set", "attack.start=foo"], "config key 'attack.start' must be one of auto, gaussian, uniform, uniform_unprojected, none"),
    (TRAIN + ["--set", "optim.schedule=foo"], "config key 'optim.schedule' must be one of piecewise, cosine, constant"),
    (TRAIN + ["--set", "optim.momentum=1.5"], "config key 'optim.momentum' must be in [0, 1), got 1.5"),
    (TRAIN + ["--set", "amp=foo"], "config key 'amp' must be one of auto, off, bf16, fp16"),
    (TRAIN + ["--set", "model.arch=resnet99"], "unknown model 'resnet99'"),
    (TRAIN + ["--set", "seed=-5"], "config key 'seed' must be an integer in [0, 2147483647], got -5"),
    (TRAIN + ["--set", "data.name=mnist"], "unknown dataset 'mnist'"),
    (TRAIN + ["--set", "name=../escape"], "config key 'name' must be a folder name"),
    (TRAIN + ["--set", "log_every=0"], "config key 'log_every' must be an integer >= 1, got 0"),
    (TRAIN + ["--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (TRAIN + ["--set", "nonsense"], "must look like key.sub=value"),
    (TRAIN + ["--device", "foo"], "unknown device 'foo'"),
    (["train", "--config", "digits_teacher_clean", "--out-dir", "{file}"], "--out-dir {file} is an existing file"),
    (TRAIN + ["--resume"], "nothing to resume"),
    (TRAIN + ["--method", "bmtard"], "argument --method: invalid choice: 'bmtard'"),
    (DISTILL + ["--set", "teachers.robsut.checkpoint=x"], "unknown teacher role 'robsut'; valid roles: robust, clean"),
    (DISTILL + ["--set", "method=trades"], "not a `robustedge distill` method"),
    # --- quantization-aware training ---------------------------------------------------------
    (TRAIN + ["--qat-from", "{missing}"], "config key 'qat.from_checkpoint': no such file"),
    (TRAIN + ["--qat-activations", "int4"], "argument --qat-activations: invalid choice: 'int4'"),
    (TRAIN + ["--qat", "--compile"], "quantization-aware training does not support compile: true"),
    (TRAIN + ["--set", "qat.from_checkpoint={ckpt}"], "config key 'qat.from_checkpoint' needs qat.enabled: true"),
    (TRAIN + ["--qat", "--set", "qat.calibration_n=-1"], "qat.calibration_n"),
    (TRAIN + ["--qat", "--set", "qat.activations=fp8"], "qat.activations"),
    (TRAIN + ["--qat-from", "{ckpt}"], "the config trains resnet20"),  # a float student of another architecture
    (TRAIN + ["--qat", "--qat-freeze-epochs", "-1"], "--qat-freeze-epochs must be an integer >= 0, got -1"),
    (TRAIN + ["--qat-freeze-epochs", "1"], "config key 'qat.freeze_epochs' needs qat.enabled: true"),
    (TRAIN + ["--qat", "--qat-freeze-epochs", "11"], "more than the run's 10 epochs"),
    (TRAIN + ["--qat", "--qat-carry-method-state"], "config key 'qat.carry_method_state' needs qat.from_checkpoint"),
    (TRAIN + ["--qat-from", "{ckpt}", "--qat-carry-method-state"], "needs the float run's training state"),
    (["distill", "--qat-from", "{missing}"], "--qat-from: no such file"),
    (["distill", "--qat-from", "{ckpt}"], "does not record the config it was trained with"),
    (["distill", "--qat-from", "{docs}"], "is a folder; give the float student's model file"),
    (["distill", "--qat-from", "{qat_ckpt}"], "is already a QAT student; fine-tune from a float one"),
    (["distill", "--qat-from", "{file}"], "notes.txt"),
    (TRAIN + ["--qat", "--qat-float-teacher", "-1"], "--qat-float-teacher must be >= 0, got -1"),
    (TRAIN + ["--qat", "--qat-float-teacher", "nan"], "--qat-float-teacher must be a finite number"),
    (TRAIN + ["--qat", "--qat-float-teacher", "1"], "config key 'qat.float_teacher' needs qat.from_checkpoint"),
    (TRAIN + ["--qat", "--qat-disagreement", "-0.5"], "--qat-disagreement must be >= 0, got -0.5"),
    (TRAIN + ["--qat", "--qat-disagreement", "1"], "config key 'qat.disagreement' needs qat.from_checkpoint"),
    (TRAIN + ["--qat-from", "{ckpt}", "--qat-float-control", "--qat-disagreement", "1"],
     "'qat.disagreement' needs qat.from_checkpoint and qat.enabled: true"),
    (TRAIN + ["--qat-float-control"], "'qat.float_control' runs the fine-tune of qat.from_checkpoint in "
                                      "float: it needs qat.from_checkpoint and qat.enabled: false"),
    (TRAIN + ["--qat-from", "{ckpt}", "--qat-float-control", "--qat"], "it needs qat.from_checkpoint and qat.enabled"),
    (TRAIN + ["--qat-from", "{ckpt}", "--set", "qat.float_control=true"], "(--qat-from FILE --qat-float-control)"),
    (TRAIN + ["--set", "qat.float_control=maybe"], "'qat.float_control' expects a boolean (true/false), got 'maybe'"),
    (["export", "{ckpt}", "--out", "{new}", "--int8-quantizer", "tflite"], "argument --int8-quantizer: invalid choice"),
    (["export", "{ckpt}", "--out", "{new}", "--int8-quantizer", "pt2e", "--calibration-method", "entropy"],
     "the pt2e quantizer calibrates by min-max"),
    (["export", "{ckpt}", "--out", "{new}", "--int8-float-layers", "middle"],
     "argument --int8-float-layers: invalid choice"),
    (["export", "{ckpt}", "--out", "{new}", "--int8-quantizer", "pt2e", "--int8-float-layers", "first"],
     "--int8-float-layers is onnxruntime's"),
    (["export", "{ckpt}", "--out", "{new}", "--formats", "onnx,onnx-fp16", "--int8-float-layers", "first"],
     "--formats asked for none of them (onnx, onnx-fp16)"),
    (["export", "{qat_ckpt}", "--out", "{new}", "--int8-float-layers", "last"], "a QAT student's INT8 files are the"),
    # --- quickstart: nothing of the previous results is deleted before the settings are checked ---
    (QUICKSTART + ["--device", "foo"], "unknown device 'foo'"),
    pytest.param(QUICKSTART + ["--device", "cuda"], "CUDA is not available", marks=NO_CUDA),
    (QUICKSTART + ["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (QUICKSTART + ["--n", "0"], "--n must be an integer >= 1, got 0"),
    (QUICKSTART + ["--teacher-epochs", "x"], "--teacher-epochs must be an integer, got 'x'"),
    (QUICKSTART + ["--attacks", "foo"], "unknown attack 'foo'"),
    (QUICKSTART + ["--seed", "-1"], "--seed must be an integer in [0, 2147483647], got -1"),
    (QUICKSTART + ["--qat", "--qat-epochs", "0"], "--qat-epochs must be an integer >= 1, got 0"),
    (QUICKSTART + ["--train-n", "0"], "--train-n must be an integer >= 1, got 0"),
    (QUICKSTART + ["--train-n", "all"], "--train-n must be an integer, got 'all'"),
    (QUICKSTART + ["--qat", "--no-export"], "--qat compares exported INT8 artifacts"),
    (["quickstart", "--out", "{file}"], "is an existing file, not a folder"),
    (["quickstart", "--out", "{docs}"], "is not empty and is not a RobustEdge quickstart folder"),
    (["quickstart", "--out", "{live_quickstart}"], "is being written by a quickstart that is still running"),
    # --- report ------------------------------------------------------------------------------------
    (["report", "{missing}"], "is not a folder"),
    (["report", "{docs}"], "no training runs (folders with metrics.csv)"),
    (["report", "{runs}", "--out", "{file}"], "is an existing file, not a folder"),
    (["report", "{runs}", "--out", "{docs}"], "is not empty and is not a RobustEdge report folder"),
    (["report", "{runs}", "--out", "{world}"], "an input of this command"),
    (["report", "{runs}", "--curve-n", "-1"], "--curve-n must be an integer >= 0, got -1"),
    # --- app -----------------------------------------------------------------------------------------
    (["app", "--port", "0"], "--port must be an integer in [1, 65535], got 0"),
    (["app", "--port", "70000"], "--port must be an integer in [1, 65535], got 70000"),
    (["app", "--port", "abc"], "--port must be an integer, got 'abc'"),
    (["app", "--models", "{missing}"], "models folder {missing} does not exist"),
    (["app", "--arch", "resnet18"], "--arch describes a foreign model: name it with --model SRC"),
    (["app", "--dataset", "digits"], "--dataset describes a foreign model: name it with --model SRC"),
    (["app", "--width", "0.5"], "--width describes a foreign model: name it with --model SRC"),
    (["app", "--model", "{state_pth}"], "is not a RobustEdge checkpoint: pass --arch"),
    (["app", "--model", "{missing}", "--arch", "resnet18"], "checkpoint not found"),
    (["app", "--model", "{state_pth}", "--arch", "resnet20", "--dataset", "digits"],
     "does not fit architecture 'resnet20'"),
    (["app", "--model", "{foreign_safetensors}"], "is a safetensors file but not a RobustEdge model"),
    (["app", "--model", "{ckpt}", "--model", "{ckpt}"], "a --model source is given twice"),
    (["app", "--model", "{ckpt}", "--data-root", "{missing}"], "--data-root {missing} is not a folder"),
    (["app", "--model", "{ckpt}", "--eps", "2"], "--eps must be in [0, 1], got 2"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
]


def _write_bundle_variant(src: Path, dst: Path, edit_manifest=None, edit_samples=None) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    if edit_samples is not None:
        with np.load(dst / "verify.npz") as data:
            samples = {k: data[k] for k in data.files}
        edit_samples(samples)
        np.savez_compressed(dst / "verify.npz", **samples)
        manifest["samples"]["sha256"] = hashlib.sha256((dst / "verify.npz").read_bytes()).hexdigest()
    if edit_manifest is not None:
        manifest = edit_manifest(manifest)
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (dst / "manifest.json").write_text(text)
    return dst


def _bundle_variants(bundle: Path, root: Path) -> dict[str, Path]:
    def setting(path: list[str], value):
        def edit(m):
            node = m
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            return m
        return edit

    def drop(key):
        return lambda m: {k: v for k, v in m.items() if k != key}

    def samples_object(s):
        s["x"] = np.array([object()] * len(s["y"]), dtype=object)

    def symlinked(m):
        return m

    variants = {
        "b_badjson": dict(edit_manifest=lambda m: "{not json"),
        "b_list": dict(edit_manifest=lambda m: "[1, 2]"),
        "b_nofiles": dict(edit_manifest=drop("files")),
        "b_escape": dict(edit_manifest=setting(["files", "onnx", "file"], "../outside.onnx")),
        "b_absolute": dict(edit_manifest=setting(["files", "onnx", "file"], str(root / "outside.onnx"))),
        "b_unknown_format": dict(edit_manifest=lambda m: m | {"files": m["files"] | {"tflite": m["files"]["onnx"]}}),
        "b_unknown_gate": dict(edit_manifest=setting(["gate", "max_drop_typo"], 0.1)),
        "b_gate_range": dict(edit_manifest=setting(["gate", "min_agreement"], 7)),
        "b_eps_string": dict(edit_manifest=setting(["eps"], "abc")),
        "b_eps_nan": dict(edit_manifest=lambda m: json.dumps(m).replace('"eps": 0.1', '"eps": NaN')),
        "b_table_string": dict(edit_manifest=setting(["table", "torch", "clean"], "high")),
        "b_bad_flag": dict(edit_manifest=setting(["flags", "onnx"], [{"check": "vibes", "examples": 1, "of": 2,
                                                                        "detail": ""}])),
        "b_square_count": dict(edit_manifest=setting(["samples", "square", "onnx"], 10_000)),
        "b_whitebox_format": dict(edit_manifest=setting(["samples", "whitebox", "tflite"], ["pgd20"])),
        "b_npz_object": dict(edit_samples=samples_object),
        "b_npz_missing": dict(edit_samples=lambda s: s.pop("torch_pred")),
        "b_npz_shape": dict(edit_samples=lambda s: s.update(x=s["x"][:, :, :8, :8].copy())),
        "b_npz_labels": dict(edit_samples=lambda s: s.update(y=s["y"].astype(np.float32))),
        "b_symlink": dict(edit_manifest=symlinked),
        "b_deep": dict(edit_manifest=lambda m: "[" * 200_000 + "]" * 200_000),
        "b_tampered": dict(),
        "b_missing_file": dict(),
    }
    paths = {name: _write_bundle_variant(bundle, root / name, **kw) for name, kw in variants.items()}
    (root / "outside.onnx").write_bytes((bundle / "model.onnx").read_bytes())
    (paths["b_symlink"] / "model.onnx").unlink()
    (paths["b_symlink"] / "model.onnx").symlink_to(root / "outside.onnx")
    data = bytearray((paths["b_tampered"] / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (paths["b_tampered"] / "model.int8.onnx").write_bytes(bytes(data))
    (paths["b_missing_file"] / "model.fp16.onnx").unlink()
    return paths


def _broken_checkpoints(ckpt: Path, root: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    from robustedge.checkpoint import save_model
    from robustedge.weights import load_model

    model, meta = load_model(ckpt)
    paths = {}
    for name, value in (("nan_ckpt", float("nan")), ("inf_ckpt", float("inf"))):
        broken, _ = load_model(ckpt)
        with torch.no_grad():
            broken.fc.bias.fill_(value)
        paths[name] = save_model(root / f"{name}.safetensors", broken, meta)
    paths["truncated"] = root / "truncated.safetensors"
    paths["truncated"].write_bytes(ckpt.read_bytes()[:300])
    paths["pickle"] = root / "pickle.safetensors"
    torch.save({"not": "a model"}, paths["pickle"])
    paths["foreign_safetensors"] = root / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(paths["foreign_safetensors"]))
    paths["state_pth"] = root / "kuangliu.pth"  # a foreign checkpoint the way kuangliu's pytorch-cifar saves one
    torch.save({"net": {f"module.{k}": v for k, v in model.state_dict().items()}, "acc": 90.0, "epoch": 9},
               paths["state_pth"])
    from robustedge.qat import prepare_qat

    meta.extra["qat"] = {"activations": "uint8", "patterns": "onnxruntime", "library": "torchao", "from_checkpoint": None}
    paths["qat_ckpt"] = save_model(root / "qat.safetensors", prepare_qat(model, meta.spec.input_shape).eval(), meta)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = load_model(ckpt)[1]  # the float model's (the QAT row above changed this one)
    paths["int_pth"] = root / "integer_weights.pth"
    torch.save({k: (v * 100).round().long() if v.is_floating_point() else v for k, v in state.items()},
               paths["int_pth"])
    paths["nan_pth"] = root / "nan_weights.pth"
    torch.save({k: v.clone().fill_(float("nan")) if k == "fc.bias" else v for k, v in state.items()}, paths["nan_pth"])
    for name, edit in (("norm_meta", lambda raw: raw["spec"].update(mean=[0.5, 0.5], std=[0.2, 0.2])),
                       ("eps_meta", lambda raw: raw.update(eps=2)),
                       ("qat_meta", lambda raw: raw.setdefault("extra", {}).update(
                           qat={"activations": "uint8", "patterns": "somewhere"}))):
        raw = json.loads(meta.to_json())
        edit(raw)
        paths[name] = root / f"{name}.safetensors"
        save_file(state, str(paths[name]), metadata={"format": "robustedge/1", "robustedge": json.dumps(raw)})
    overflowing, _ = load_model(ckpt)  # finite weights whose logits overflow to Inf/NaN
    with torch.no_grad():
        overflowing.fc.weight.div_(overflowing.fc.weight.abs().max()).mul_(3e38)
    paths["nan_logits"] = save_model(root / "nan_logits.safetensors", overflowing, meta)
    paths["bad_meta"] = root / "bad_meta.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(paths["bad_meta"]),
              metadata={"format": "robustedge/1", "robustedge": json.dumps({"spec": {"arch": "resnet20"},
                                                                             "extra": "not a mapping"})})
    return paths


@pytest.fixture(scope="module")
def world(tmp_path_factory, digits_checkpoint):
    """Everything the rows refer to, in one folder whose every byte is compared before and after."""
    from robustedge.edge.bundle import ExportOptions, export_bundle
    from robustedge.files import writer_identity

    root = tmp_path_factory.mktemp("world")
    ckpt = root / "model.safetensors"
    shutil.copy(digits_checkpoint, ckpt)
    bundle = root / "bundle"
    export_bundle(ckpt, bundle, ExportOptions(n=16, calibration_n=32, transfer_attacks=("pgd20",), square_n=0),
                  progress=lambda m: None)
    paths = {"world": root, "ckpt": ckpt, "bundle": bundle, "new": root / "new_output",
             "missing": root / "missing.safetensors", "file": root / "notes.txt", "docs": root / "documents"}
    paths["file"].write_text("a user's file")
    paths["docs"].mkdir()
    (paths["docs"] / "thesis.tex").write_text("precious")
    paths["foreign_eval"] = root / "their_eval"
    paths["foreign_eval"].mkdir()
    (paths["foreign_eval"] / "eval.json").write_text('{"my": "notes"}')
    paths["bundle_with_ckpt"] = root / "bundle_with_ckpt"
    shutil.copytree(bundle, paths["bundle_with_ckpt"])
    paths["ckpt_in_bundle"] = paths["bundle_with_ckpt"] / "source.safetensors"
    shutil.copy(ckpt, paths["ckpt_in_bundle"])
    paths.update(_broken_checkpoints(ckpt, root))
    paths.update(_bundle_variants(bundle, root))
    configs = root / "configs"
    configs.mkdir()
    for name, text in (("yaml_ten", "epochs: ten\n"), ("yaml_list", "- 1\n- 2\n"), ("yaml_invalid", "a: [1, 2\n")):
        paths[name] = configs / f"{name}.yaml"
        paths[name].write_text(text)
    paths["binary"] = configs / "binary.yaml"
    paths["binary"].write_bytes(bytes(range(256)) * 4)
    quickstart = root / "quickstart"
    quickstart.mkdir()
    (quickstart / "quickstart.json").write_text(json.dumps({"format": "robustedge-quickstart/1", "status": "done"}))
    (quickstart / "results.md").write_text("last week's results")
    paths["quickstart"] = quickstart
    live = root / "live_quickstart"
    live.mkdir()
    (live / "quickstart.json").write_text(json.dumps({"format": "robustedge-quickstart/1", "status": "running",
                                                      "writer": writer_identity()}))
    paths["live_quickstart"] = live
    runs = root / "runs" / "r1"
    runs.mkdir(parents=True)
    shutil.copy(ckpt, runs / "best.safetensors")
    (runs / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    paths["runs"] = runs
    paths["md_dir"] = root / "verify_report"
    (paths["md_dir"] / "verify.md").mkdir(parents=True)  # a folder where the report file would go
    return paths


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden temporaries included) with its content hash or link target."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def _fill(text: str, paths: dict[str, Path]) -> str:
    for key, value in paths.items():
        text = text.replace("{" + key + "}", str(value))
    return text


@pytest.mark.parametrize("argv,message", CASES, ids=[f"{i:03d}" for i in range(len(CASES))])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, argv, message, capsys, monkeypatch):
    monkeypatch.chdir(world["world"])  # anything written to a default path would land in the snapshot
    while "=" in argv[0]:  # the environment of the row
        name, value = argv[0].split("=", 1)
        monkeypatch.setenv(name, _fill(value, world))
        argv = argv[1:]
    before = snapshot(world["world"])
    code = main([_fill(a, world) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert _fill(message, world) in err, err
    assert "Traceback" not in err + out
    assert snapshot(world["world"]) == before


def test_there_are_enough_cases_and_every_command_has_some():
    commands = {next(a for a in (case.values[0] if hasattr(case, "values") else case[0]) if "=" not in a)
                for case in CASES}
    assert len(CASES) >= 60
    assert {"eval", "export", "import", "verify", "train", "distill", "quickstart", "report", "app"} <= commands


BUNDLE_ROWS = [c for c in CASES if isinstance(c, tuple) and c[0][0] == "verify" and c[0][1].startswith("{b_")]


@pytest.mark.parametrize("argv,message", BUNDLE_ROWS, ids=[c[0][1].strip("{}") for c in BUNDLE_ROWS])
def test_the_bundle_verifier_refuses_with_the_same_message(world, argv, message):
    """The bundle's own verify.py (the torch-free core) says what `robustedge verify` says."""
    bundle = Path(_fill(argv[1], world))
    verifier = world["bundle"] / "verify.py"  # every bundle carries the same file; variants may have lost theirs
    before = snapshot(world["world"])
    hide_torch = ("import sys, runpy; sys.modules['torch'] = None; sys.modules['robustedge'] = None; "
                  f"sys.argv = ['verify.py', {str(bundle)!r}]; runpy.run_path({str(verifier)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", hide_torch], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and _fill(message, world) in proc.stderr, proc.stderr
    assert snapshot(world["world"]) == before


BENCH_ROWS = [  # bench/qat_compare.py: every folder, config, seed and --out checked before --out is created
    (["run", "{world}/no_run", "--out", "{world}/new_out"], "is not a finished training run"),
    (["run", "{run}", "--out", "{file}"], "is a file, not a folder"),
    (["run", "{run}", "{run}", "--out", "{world}/new_out"], "two run folders share a name"),
    (["config", "{world}/no_such.yaml", "--out", "{world}/new_out"], "config file not found"),
    (["config", "{world}", "--out", "{world}/new_out"], "is not a file"),
    (["config", "{file}", "--out", "{world}/new_out"], "must be a mapping"),
    (["config", "{recipe}", "--seeds", "1", "1", "--out", "{world}/new_out"], "a seed is given twice"),
    (["digits", "--seeds", "0", "0", "--out", "{world}/new_out"], "a seed is given twice"),
    (["config", "{recipe}", "--device", "tpu", "--out", "{world}/new_out"], "unknown device 'tpu'"),
    (["config", "{recipe}", "--seeds", "-1", "--out", "{world}/new_out"], "--seeds must be"),
]


@pytest.mark.parametrize("argv,message", BENCH_ROWS, ids=["no-run", "out-is-file", "same-name", "no-config",
                                                          "config-is-folder", "bad-config", "seed-twice",
                                                          "digits-seed-twice", "unknown-device", "negative-seed"])
def test_the_qat_benchmark_refuses_in_one_line_before_touching_disk(tmp_path, argv, message, capsys):
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("qat_compare", root / "bench" / "qat_compare.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = tmp_path / "runs" / "s0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: s0\n")
    (run / "best.safetensors").write_bytes(b"")
    (tmp_path / "a_file").write_text("mine")
    paths = {"world": tmp_path, "run": run, "file": tmp_path / "a_file",
             "recipe": root / "bench" / "configs" / "mnv2_32.yaml"}
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        bench.main([_fill(a, paths) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and message in err[-1], err
    assert snapshot(tmp_path) == before and not (tmp_path / "new_out").exists()
