"""clip-retrieval's own back end (clip_retrieval.clip_back: its Flask app, its faiss index loading and its Arrow
metadata provider) over a psdclip index, for benchmarks/vs_clip_retrieval.py. Run with the Python of the venv that
holds clip-retrieval (its pins clash with psdclip's: numpy<2 and others), never psdclip's.

Two things are replaced, nothing else: the model loader (all_clip.load_clip fetches named weights from a hub;
here it builds the same open_clip model from the psdclip checkpoint's weights), and Flask's listening address
(clip_back binds 0.0.0.0; this binds 127.0.0.1 only).

    python _clip_retrieval_back.py INDICES_JSON PORT CHECKPOINT MODEL_CONFIG_DIR
"""
import json
import os
import sys
import tempfile


def main():
    indices_json, port, checkpoint, config_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import all_clip
    import flask
    import open_clip
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    arch = state["model_arch"]
    if state.get("model_cfg"):  # a model config stored in the checkpoint
        config_dir = tempfile.mkdtemp()
        with open(os.path.join(config_dir, arch + ".json"), "w", encoding="utf-8") as f:
            f.write(state["model_cfg"] if isinstance(state["model_cfg"], str) else json.dumps(state["model_cfg"]))
    open_clip.add_model_config(config_dir)

    def load_clip(clip_model, use_jit=True, device="cpu", **_):
        model, _, preprocess = open_clip.create_model_and_transforms(arch, device=device)
        model.load_state_dict(state["model"])
        model.eval()
        return model, preprocess, open_clip.get_tokenizer(arch)

    all_clip.load_clip = load_clip  # clip_back imports it from all_clip when it loads an index
    run = flask.Flask.run
    flask.Flask.run = lambda self, host=None, port=None, **kw: run(self, host="127.0.0.1", port=port, **kw)

    from clip_retrieval.clip_back import clip_back

    # clip-retrieval's options for a large collection: memory-mapped faiss index, Arrow metadata (memory-mapped);
    # no multilingual text model, aesthetic embeddings or safety models (they need downloads)
    clip_back(indices_paths=indices_json, port=port, enable_faiss_memory_mapping=True, use_arrow=True,
              columns_to_return=["url", "caption", "key"], enable_mclip_option=False, clip_model=arch, use_jit=False,
              provide_safety_model=False, provide_violence_detector=False, provide_aesthetic_embeddings=False)


if __name__ == "__main__":
    main()
