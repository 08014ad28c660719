import sys

from resnetlab.cli.main import main

sys.exit(main())
