"""The flow (``mole_nf``), its blocks, the loss, the router and the patch memory."""
