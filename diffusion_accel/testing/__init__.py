"""Test and demo helpers: tiny pipelines built from config, local tokenizers, contract checks."""
