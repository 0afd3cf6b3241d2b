"""Hook implementations of the InstructPix2Pix plugin (entry point ``instructpix2pix``).

The edit path is a library function for now (:func:`t2i_plugin_instructpix2pix.edit.edit_images`);
no task, conditioner or format is registered yet (docs/instructpix2pix.md says what is planned).
"""

from __future__ import annotations
