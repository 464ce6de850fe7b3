"""What to train: the base model and the task it implies."""

from pathlib import Path

from .setting import IMAGES, SD_ONLY, Form, Setting

SECTION = "Model"
SETTINGS = (
    Setting("base_model", Path, None, "Base model: an SD/SDXL single file (.safetensors/.ckpt), a Flux.1 file (the "
            "Black Forest Labs transformer, fp8 too, with flux_ae/flux_clip_l/flux_t5xxl; or ComfyUI's all-in-one "
            "checkpoint), a diffusers folder (SD or Flux), or a Transformers causal-LM folder.", required=True, path="read", exists="any",
            form=Form("host", "Base model")),
    Setting("task", str, "auto", "sd, flux or llm; auto detects it from base_model (the job's stored config "
            "says what was found).", choices=("auto", "sd", "flux", "llm"), form=Form("hidden")),
    Setting("model_config", Path, None, "A diffusers-format folder of component configs (model_index.json, unet/ or "
            "transformer/, vae/, ...) for a single-file checkpoint of a non-standard size. Standard SD1.5 and Flux.1 "
            "files need nothing (Flux of another size is read from the file's own shapes).",
            tasks=IMAGES, optional=True, path="read", exists="dir"),
    Setting("prediction_type", str, "auto", "What the UNet predicts. auto: a diffusers folder's scheduler; in a "
            "single file a `v_pred` marker or, for SD2, the v-prediction fingerprint in the weights (else v for "
            "SD2, the 768 models being the common ones; epsilon for SD1/SDXL).",
            tasks=SD_ONLY, choices=("auto", "epsilon", "v_prediction")),
)
RULES = ()
