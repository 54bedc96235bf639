"""Reading what a user asks for: pipeline specs (`spec`), with file:line errors (`yamlpos`),
catalogue files (`catalogue`) and the folders a spec or catalogue may name (`confine`).

The bottom layer: imports nothing else of `flows`."""
