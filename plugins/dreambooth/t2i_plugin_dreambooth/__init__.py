"""DreamBooth for t2i-engine (Ruiz et al. 2022, arXiv 2208.12242): teach a model a subject from a
few images under a rare identifier ("a sks dog"), with prior preservation from the model's own
samples of the class ("a dog"); full fine-tune or LoRA, for any model plugin that implements the
model-bundle contract (:class:`t2i_engine.interfaces.LatentDiffusionModel`). See docs/dreambooth.md."""

__version__ = "0.1.0"
