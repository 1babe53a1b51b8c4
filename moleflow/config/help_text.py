"""``--help`` text of every AblationConfig field: what the flag does, its unit, its choices.

``config/cli.py`` appends ``(default: ...)``; a test checks that every field has an entry here.
For a boolean ``use_X`` the text describes ``--use_X``; ``--no_X`` turns it off.
"""

from __future__ import annotations

from moleflow.config.ablation import ANOMALY_SCORES, PRESETS

HELP: dict[str, str] = {
    # --- data ---
    "dataset": "dataset layout, one of mvtec, visa (root/split_csv/1cls.csv), mpdd, folder (any MVTec-layout "
               "folder)",
    "data_path": "dataset root folder (for --dataset visa the folder that holds split_csv/)",
    "task_classes": "class names in task order (default: the dataset's standard list: MVTec AD 15, VisA 12, "
                    "MPDD 6 classes; folder: every class folder with train/good under --data_path, sorted)",
    "cl_scenario": "B-I: the first task takes B classes, each later task I classes (1-1, 14-1, 10-5, 3-3); "
                   "classes of one task share one expert",
    "img_size": "side of the square network input in pixels (>= 32)",
    "resize_mode": "how an image becomes img_size x img_size, one of crop (shorter side to img_size, centre "
                   "crop) or squash (whole image resized, aspect ratio not kept)",
    "use_augmentation": "random flip and +-10%% brightness/contrast of training images, backbone re-run every "
                        "epoch",
    "val_fraction": "fraction of each class's train/good images held out (never trained on, chosen by --seed) to "
                    "set the class's decision threshold and the router's unknown-class limit; 0 = train on every "
                    "training image as the papers do (then no threshold)",
    # --- backbone ---
    "backbone_name": "timm backbone name (CNNs via feature_info, vit_*/deit_*/DINO via forward_intermediates); "
                     "efficientnet_lite0 loads offline ImageNet weights",
    "backbone_weights": "local state-dict file (.pth/.pt/.safetensors) for the backbone instead of downloading",
    "feature_dim": "D, channels of each patch feature the flow models (multiple of 4)",
    "feature_strides": "strides (px) of the CNN stages whose maps make the patch features; the patch grid is "
                       "the stride-8 one",
    "feature_pooling": "unfold: each stage's 3x3 neighbourhood vectors pooled to D, stages averaged (paper); "
                       "avg: each channel's 3x3 mean, stages concatenated, then pooled to D",
    # --- feature cache ---
    "use_feature_cache": "keep the backbone's features of every image (not augmented ones) on disk and read them in "
                         "later runs instead of decoding and extracting (README: Feature cache)",
    "feature_cache": "feature cache folder (default: $MOLEFLOW_CACHE_DIR, else $XDG_CACHE_HOME/moleflow/features, "
                     "else ~/.cache/moleflow/features); shared safely by concurrent runs",
    "feature_cache_max_gb": "largest size of the feature cache folder in GB (1e9 bytes); past it the least recently "
                            "used entries are deleted after a run stores new ones",
    # --- flow ---
    "num_coupling_layers": "number of shared MoLE affine coupling blocks",
    "dia_n_blocks": "number of per-task DIA coupling blocks after the shared ones",
    "lora_rank": "rank r of each task's LoRA expert in every coupling subnet",
    "lora_alpha": "LoRA scale alpha: an expert adds (alpha / r) * B A x",
    "clamp_alpha": "soft clamp c of the coupling log-scale: s = c * tanh(a)",
    "dia_hidden_ratio": "hidden width of the DIA subnets as a fraction of D/2",
    "scale_context_kernel": "side in patches of the depthwise conv that gives each coupling's scale branch "
                            "its neighbourhood (odd)",
    "spatial_context_kernel": "side in patches of the shared spatial context mixer's depthwise conv (odd)",
    # --- module switches ---
    "use_lora": "give every task its own LoRA expert in the shared coupling blocks",
    "use_dia": "give every task its own DIA coupling blocks",
    "use_task_adapter": "give every task its own input adapter",
    "use_whitening_adapter": "the task adapter is the whitening one (LayerNorm, bounded gain and shift); off: "
                             "FiLM + LayerNorm",
    "use_router": "route each test image to an expert with the task prototypes; off: the true task is used "
                  "(oracle, routing accuracy reported as n/a)",
    "use_mahalanobis": "router distance is Mahalanobis with a shrinkage covariance; off: Euclidean",
    "use_pos_embed": "add the fixed 2-D sinusoidal positional encoding to the patch features",
    "use_spatial_context": "shared spatial context mixer before the coupling blocks",
    "use_scale_context": "neighbourhood (depthwise conv) input to each coupling's scale branch",
    "freeze_base": "freeze the shared flow weights after task 0 (off only in baseline_nf: naive fine-tuning)",
    # --- training ---
    "num_epochs": "training epochs per task",
    "lr": "peak learning rate (cosine schedule over each task's epochs)",
    "batch_size": "training images per optimizer step (scoring passes take 2x, at least 128 on a GPU)",
    "optimizer": "one of adamw (decoupled weight decay) or adam (weight decay as an L2 term in the gradient)",
    "weight_decay": "weight-decay coefficient wd, used by both optimizers (adamw: p -= lr * wd * p each step; "
                    "adam: wd * p added to the gradient)",
    "grad_clip": "largest global gradient norm before each step (> 0)",
    "warmup_epochs": "linear learning-rate warm-up of tasks after the first, in epochs",
    "max_skip_fraction": "fraction of a task's batches that may have a non-finite loss (skipped) before the "
                         "task stops with an error, in [0, 1)",
    # --- loss ---
    "use_tail_aware_loss": "weight the largest per-patch losses of each image extra (tail-aware loss)",
    "tail_weight": "weight w of the tail term in [0, 1]: (1-w) * mean + w * top-k mean",
    "tail_top_k_ratio": "fraction of an image's patches that form its tail, in (0, 1]",
    "lambda_logdet": "weight lambda of the loss term lambda * mean over patches of (log|det J|)^2",
    # --- scoring ---
    "score_aggregation_mode": "image score from the patch scores, one of top_k (mean of the k largest), max, "
                              "mean, percentile",
    "score_aggregation_top_k": "k of top_k, in patches (at most the patch grid, e.g. 28x28 = 784 at 224 px)",
    "score_aggregation_percentile": "percentile in [0, 100] of the percentile mode",
    "anomaly_map_sigma": "Gaussian blur of the pixel anomaly map, sigma in pixels (>= 0; 0 = no blur)",
    "anomaly_score": f"patch anomaly score, one of {', '.join(ANOMALY_SCORES)}: the flow's NLL, the per-task "
                     "patch memory's distance, or both standardised and mixed",
    "memory_size": "patches kept per task in the patch memory (greedy coreset; 0 keeps every patch)",
    "memory_weight": "weight of the memory distance in the fused score, in (0, 1)",
    "threshold_quantile": "a class's threshold is this quantile (linear interpolation) of its held-out images' "
                          "image scores, in (0, 1]; an image scoring above it is anomalous",
    # --- SLOW stage ---
    "enable_slow_stage": "for the last epochs of each later task, also train the last shared blocks (causes "
                         "forgetting by design)",
    "slow_blocks_k": "number of last shared blocks the SLOW stage unfreezes",
    "slow_lr_ratio": "learning rate of the SLOW stage as a fraction of --lr",
    "slow_stage_start": "fraction of a task's epochs after which the SLOW stage starts, in (0, 1)",
    # --- evaluation / output ---
    "eval_oracle": "after the last task, also evaluate with the true task id (final_results_oracle.csv)",
    "run_diagnostics": "write flow-analysis plots to <experiment>/diagnostics/",
    "log_dir": "folder that receives the experiment folders <experiment_name>_<timestamp>/",
    "experiment_name": "first part of the experiment folder's name (an extended --resume run adds _ext)",
    "seed": "seed of every random draw (same seed + data on the CPU = same bytes)",
    "device": "where the flow runs, one of auto (CUDA if present), cpu, cuda, cuda:N",
    "num_workers": "image-decoding worker processes (at most 16), started once per run and overlapped with the "
                   "backbone; 0 (default): decode on a thread pool of this process, also while the backbone runs",
    "amp": "on CUDA, bf16 autocast and channels-last for the frozen backbone (no effect on the CPU, says so)",
    "tf32": "on CUDA, TF32 float32 matrix products in the flow (routing stays full float32; no effect on the "
            "CPU, says so)",
    "cuda_graphs": "on CUDA, record the training step once per task as a CUDA graph and replay it "
                   "(same kernels, no per-kernel Python launch); no effect on the CPU",
    "compile_flow": "on CUDA, fuse the flow's element-wise work with torch.compile (all scoring, and training "
                    "from the second task on; tens of seconds of compiling per run; scores equal to float "
                    "tolerance); no effect on the CPU",
    "compile_ahead": "with --compile_flow: while task 0 trains, a child process compiles the later tasks' "
                     "training step into torch's on-disk cache, so that task 1 does not wait for it",
    "quiet": "print only warnings, errors and the final result lines (training.log stays complete)",
    "resume": "experiment folder to continue (interrupted run) or extend (with new --task_classes; old and "
              "new classes must be under one --data_path)",
    "ablation_preset": f"group of switches, one of {', '.join(PRESETS)}; explicit flags win, flags the "
                       "preset makes meaningless are ignored with a warning",
    "demo": "generate the embedded demo dataset (once) and run the main pipeline on it offline",
}

# How a flag's value is shown in --help: the choices, or what kind of value it takes.
METAVARS: dict[str, str] = {
    "dataset": "{mvtec,visa,mpdd,folder}",
    "resize_mode": "{crop,squash}",
    "feature_pooling": "{unfold,avg}",
    "optimizer": "{adamw,adam}",
    "score_aggregation_mode": "{top_k,max,mean,percentile}",
    "anomaly_score": "{" + ",".join(ANOMALY_SCORES) + "}",
    "device": "{auto,cpu,cuda,cuda:N}",
    "ablation_preset": "NAME",
    "cl_scenario": "B-I",
    "data_path": "DIR",
    "log_dir": "DIR",
    "resume": "DIR",
    "backbone_weights": "FILE",
    "feature_cache": "DIR",
    "feature_cache_max_gb": "GB",
    "backbone_name": "NAME",
    "experiment_name": "NAME",
}
