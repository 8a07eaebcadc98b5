"""The lazystore daemon process: the top layer, wiring every other one.

``process`` starts the substituters, the local store, the Vfs and its FUSE
Operations, the control server, and tears them down again; ``mountpoint``
prepares the directory it mounts on; ``operations`` answers the control
operations (one handler per entry of the protocol's table). Nothing below
imports this package.
"""
