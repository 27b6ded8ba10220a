# Rules of the infer stage.
