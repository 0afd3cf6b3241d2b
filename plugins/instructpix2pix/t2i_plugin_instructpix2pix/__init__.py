"""t2i-plugin-instructpix2pix: InstructPix2Pix (Brooks et al. 2023, "InstructPix2Pix: Learning to
Follow Image Editing Instructions") on the Stable Diffusion plugin: an 8-channel UNet edits a
source image by an instruction, with dual classifier-free guidance."""
