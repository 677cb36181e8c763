"""Model-family adapters: what esm_core knows about one family of models (key roles, layer types, hooks).

``bert`` — Hugging Face BERT-family encoders (BERT, RoBERTa, DistilBERT, MiniLM) through ``transformers``.
"""
