import sys

from torchspec_ext.serve.server import main

sys.exit(main())
