"""What the callbacks share and are not callbacks themselves: the Protocols they need of a module
(:mod:`.contract`), sharded generation and gathering across ranks (:mod:`.distributed`), and the
progress bars of long loops (:mod:`.progress`)."""
