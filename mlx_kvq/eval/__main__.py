import sys

from ..cli.eval import main

sys.exit(main())
