"""The command-line tools' logic, one module per tool: ``tools/<name>.py`` in the checkout and
``retina-d2 <command>`` (retina_d2/cli.py) only call ``retina_d2.tools.<name>``'s ``main(argv)``
(``train_net``: ``cli(argv)``), which parses the tool's flags and returns its exit code.

Living in the package, the tools are importable by name, which is what lets ``launch`` hand
``train_net.main`` and ``predict.predict_shard`` to the processes of ``--num-gpus N`` /
``--num-machines N`` (it pickles the function by module and name).
"""
