"""The C++/CUDA extension backend.  Not built yet: backend="cuda" explains so."""


def extension_problem(device):
    return ("the C++/CUDA extension backend is not available in this version of fastgan; "
            "use backend='triton' or backend='torch'")
