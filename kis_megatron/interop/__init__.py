"""Interoperability with other ecosystems: Hugging Face ``LlamaForCausalLM`` export and import
(``kis_megatron.interop.hf``)."""
