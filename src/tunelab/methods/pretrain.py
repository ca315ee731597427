"""Pretraining and continued pretraining: next-token loss on every token of raw text."""

from dataclasses import dataclass

import torch

from tunelab.data import BlockCollator, build_mixed, build_text_blocks
from tunelab.engine.method import DataSplits, Models
from tunelab.errors import TunelabError
from tunelab.methods.fullfinetune_sft import FullFinetuneSFT, _unwrap
from tunelab.planning import estimate_run, model_flops_per_token


@dataclass
class CausalLMPretrain(FullFinetuneSFT):
    """Causal language modelling on text cut into ``block_size`` blocks (``data.blocks``), from a
    bare config (``modelpool.config``: random init) or continued from a model. Every token is a
    target except the first of each block (or of each document, with
    ``data.cross_document_attention=false``), which has nothing before it to be predicted from.
    The fast paths of SFT (packed rows, chunked loss, fused kernels, compile) apply unchanged."""

    block_size: int = 1024
    """Tokens per block; at most the model's context length (max_position_embeddings)."""
    fix_token_embedding: bool = False
    """Freeze the input token embeddings (pretraining trains them by default)."""

    def check(self) -> None:
        super().check()
        if self.block_size < 2:
            raise TunelabError(f"method.block_size={self.block_size}: a block needs at least 2 tokens (one to read, one to predict).")

    def build_data(self, data_cfg, tokenizer) -> DataSplits:
        sources = [s for s in data_cfg.sources or [] if isinstance(s, dict)]
        formats = {s.get("format", data_cfg.format) for s in sources} if data_cfg.sources else {data_cfg.format}
        if formats != {"text"}:
            which = "data.sources[].format" if data_cfg.sources else "data.format"
            raise TunelabError(
                f"method=lm_finetune/pretrain trains on raw text, and {which}={', '.join(sorted(formats - {'text'}))}: set {which}=text "
                "(data.text_field names the field of JSON lines, Parquet or CSV records; .txt files are read by paragraph). "
                "Conversations and instructions train with method=lm_finetune/fullfinetune_sft."
            )
        if not data_cfg.cross_document_attention and not self.packing:
            raise TunelabError(
                "data.cross_document_attention=false keeps each document's attention to itself inside a block, which "
                "needs packed rows: set method.packing=true (the default), or data.cross_document_attention=true."
            )
        return super().build_data(data_cfg, tokenizer)

    def build_split(self, data_cfg, tokenizer):
        if data_cfg.sources:
            return build_mixed(data_cfg, lambda source: build_text_blocks(source, tokenizer, self.block_size))
        return build_text_blocks(data_cfg, tokenizer, self.block_size)

    def build_models(self, pool, tokenizer) -> Models:
        model = pool.load_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None and self.block_size > context:
            raise TunelabError(
                f"method.block_size={self.block_size} is longer than the model's context length "
                f"(max_position_embeddings={context}): set method.block_size={context} or less."
            )
        return Models(self.prepare_model(model))

    def collate_fn(self, tokenizer):
        # On a GPU, batches of full blocks go as plain rows (see BlockCollator): 0.136 -> 0.089 s a
        # step for a 286M Llama on an H200 (bench/gpu_profile.py). The CPU keeps packed rows.
        return BlockCollator(tokenizer.pad_token_id, self.packing, plain_rows=torch.cuda.is_available())

    def flops_per_token(self, model: torch.nn.Module, train_set) -> float | None:
        """Model FLOPs per token; a token's attention spans its segment, so the context is the
        token-weighted mean segment length (the block, with cross-document attention)."""
        if not len(train_set):
            return None
        segments = [n for block in train_set.select(range(min(len(train_set), 2000)))["segments"] for n in block]
        return model_flops_per_token(_unwrap(model).config, sum(n * n for n in segments) / sum(segments))

    def estimate(self, model: torch.nn.Module, train_set, device, precision: str, steps: int):
        if not len(train_set):
            return None
        sample = train_set.select(range(min(len(train_set), 2000)))
        lengths = [len(ids) for ids in sample["input_ids"]]
        supervised = [n - len(segments) for n, segments in zip(lengths, sample["segments"])]
        return estimate_run(
            model, precision=precision, lengths=lengths, supervised=supervised, steps=steps,
            batch_size=int(self.dataloader_kwargs.get("batch_size", 1)), packing=self.packing,
            accumulate=self.accumulate_grad_batches, chunked_loss=self.chunked_loss,
            loss_chunk_size=self.loss_chunk_size, device=device, fused_kernels=self.fused_kernels,
        )  # fmt: skip
