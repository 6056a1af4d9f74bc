"""Learned deblur model for EM tiles: network, training, export (weights ship in appliance/weights/)."""
