"""Embedding extraction (`polymodal embed`), faiss indexes (`polymodal index`) and search (`polymodal search`).

The output follows clip-retrieval's layout, so tools built for it (autofaiss, embedding-reader, clip-retrieval's
back end) read ours:

    OUT/img_emb/img_emb_{N}.npy        [rows, D] float16 or float32
    OUT/text_emb/text_emb_{N}.npy      the same rows' caption embeddings (two-tower models with captions)
    OUT/metadata/metadata_{N}.parquet  key and fields of each row; row i matches row i of both .npy files
    OUT/skipped/skipped_{N}.jsonl      samples of part N that could not be read, with their error
    OUT/embed_info.json                model, input and settings: a rerun must match them to resume
"""
