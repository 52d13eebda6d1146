import sys

from agent.router.cli import main

sys.exit(main())
