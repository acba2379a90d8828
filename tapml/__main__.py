from tapml.cli import main

main(prog_name="tapml")
