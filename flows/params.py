"""Flow parameters as pydantic models: a deployment shows each one as a form in the Prefect UI
(descriptions as help text, Literal fields as drop-downs). The finetune flow takes
`ckptflow.config.RunConfig` itself."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from ckptflow import credentials, storage
from ckptflow.checkpointer import step_name

ExportFormat = Literal["original", "hf", "meta", "peft", "tune", "gguf"]
Dtype = Literal["keep", "bfloat16", "float16", "float32"]
ExportDtype = Literal["keep", "bfloat16", "float16", "float32", "q8_0"]   # q8_0: gguf only


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_serializer("storage_options", check_fields=False)
    def _no_credentials_in_json(self, value: dict, info) -> dict:
        # What Prefect stores as the flow's parameters: references, never a literal credential.
        return credentials.redacted(value) if info.mode_is_json() else value


class ExportParams(_Params):
    # A title is the form's label in the dashboard (else Prefect shows "Dst (Optional)").
    source: str = Field(title="Source run or checkpoint",
                        description="What to export: a run directory (e.g. ./runs/demo or s3://bucket/runs/demo), "
                                    "one of its step checkpoints (.../train/step-000040), a tune directory or a "
                                    "LoRA adapter. Any fsspec URI.")
    step: int | None = Field(None, ge=0, title="Step",
                             description="For a run: the step checkpoint to export. Empty: the run's newest "
                                         "committed step.")
    format: ExportFormat = Field("original", title="Format",
                                 description="original: the format the model came in; hf: transformers "
                                             "safetensors; meta: consolidated.00.pth + params.json; peft: the "
                                             "LoRA adapter alone; tune: ckptflow's own format; gguf: one "
                                             "file for llama.cpp / Ollama, with a Modelfile")
    dtype: ExportDtype = Field("keep", title="Dtype",
                               description="keep the checkpoint's dtype, or cast to bfloat16 / float16 / float32; "
                                           "q8_0 quantizes a gguf export")
    dst: str | None = Field(None, title="Destination",
                            description="Where to write the export. Empty: {run}/exports/<format>-step-<NNNNNN>-<dtype> "
                                        "(e.g. hf-step-000040-bfloat16; dtype 'keep' when not cast) for a run "
                                        "or one of its steps, <source>-exports/... for anything else.")
    storage_options: dict = Field(default_factory=dict, title="Storage options",
                                  description="fsspec options for the source and destination (e.g. an S3 "
                                              "endpoint_url). Credentials as references only: "
                                              '{"key": {"env": "AWS_ACCESS_KEY_ID"}} or '
                                              '{"key": {"secret": "<Secret block>"}}')

    def destination(self, step: int | None, run: str | None) -> str:
        """`dst`, or a name from what is exported: the step that `source` resolved to, the run
        it belongs to (None: not part of a run)."""
        if self.dst:
            return storage.normalize(self.dst)
        name = "-".join([self.format, *([step_name(step)] if step is not None else []), self.dtype])
        if run:
            return storage.join(storage.normalize(run), "exports", name)
        return storage.join(storage.normalize(self.source) + "-exports", name)


class EvalRequest(_Params):
    source: str = Field(description="The model to evaluate: an export, a merged model or any checkpoint (fsspec URI)")
    data: str | None = Field(None, description="Held-out data: JSONL (`text`, or `prompt`/`response`) or plain "
                                                "text. Empty: benchmark scores only (settings.tasks)")
    base: str | None = Field(None, description="The base model before fine-tuning, for before/after numbers")
    out: str | None = Field(None, description="Where results.json and request.json go. Empty: {run}/eval "
                                              "for {run}/export, else <source>-eval")
    run: str | None = Field(None, description="The run directory whose run.json and summary get the results")
    settings: dict = Field(default_factory=dict, description="ckptflow.stages.evaluate options: prompts, "
                                                             "max_new_tokens, batch_size, seq_len, max_batches, "
                                                             "tasks (lm-eval), limit")
    storage_options: dict = Field(default_factory=dict, description="fsspec options for these URIs; credentials as "
                                                                    '{"env": VAR} or {"secret": BLOCK} references')

    def destination(self) -> str:
        if self.out:
            return storage.normalize(self.out)
        src = storage.normalize(self.source)
        if storage.basename(src) == "export":
            return storage.join(storage.parent(src), "eval")
        return src + "-eval"


class ConvertParams(_Params):
    source: str = Field(description="A checkpoint directory in any readable format (fsspec URI)")
    dst: str = Field(description="Where the converted checkpoint goes")
    to: Literal["tune", "hf", "meta", "dcp"] = Field("tune", description="the output format")
    dtype: Dtype = Field("keep", description="keep, or cast to bfloat16 / float16 / float32")
    storage_options: dict = Field(default_factory=dict, description="fsspec options for these URIs; credentials as "
                                                                    '{"env": VAR} or {"secret": BLOCK} references')


def dtype_or_none(dtype: str | None) -> str | None:
    return None if dtype in (None, "keep") else dtype
