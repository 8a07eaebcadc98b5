"""The CRI image service: ``nix:0/<store path>`` references through the daemon,
everything else forwarded to containerd's CRI (``lazystore image-service``)."""
