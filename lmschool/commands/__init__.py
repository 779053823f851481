"""Every command that is not a training stage; stages keep their own CLI in lmschool/stages/."""
