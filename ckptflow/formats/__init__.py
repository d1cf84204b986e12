"""On-disk formats: one module per format, in three layers (nothing imports a layer above it).

    view.py      what every format reads into and writes from: View, Item, FilePlan, Detection,
                 Format, tensor_bytes; st.py (safetensors bytes) and plan.py (writing FilePlans)
    hf.py, tune.py, peft.py, meta.py, dcp.py, torchtune.py, litgpt.py, arch.py, adapter.py
                 one format each (sniff, open, write, describe), arch for --model-config, adapter
                 for LoRA adapters and the lazily merged view
    registry.py  FORMATS, one Format record per format, and sniff, detect, open_view, write,
                 open_adapter over them

A new format is one module and one line in registry.FORMATS.
"""
