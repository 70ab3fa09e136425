"""GPM's published Permuted-MNIST setup (Saha, Garg, Roy 2021, Sec. 5 and App. B).

10 tasks; MLP 784-100-100-10 without biases, one shared head; SGD lr 0.01, batch
10, 5 epochs per task; 300 examples per task for the representation matrices;
thresholds 0.95 / 0.99 / 0.99. As in the authors' code, 10 % of each task's
training set is held out (their validation split), so each task trains on 54,000
images. Published: ACC 93.91 %, BWT -0.03 (Table 1). Fine-tuning runs beside it.
`data.dir` defaults to ../shared/data/mnist when that directory exists.
"""

from experiments.configs.base import base_config, mnist_dir


def get_config():
    c = base_config()
    c.method = "gpm,finetune"
    c.data.source = "mnist"
    c.data.dir = mnist_dir()
    c.stream.kind = "permuted"
    c.stream.num_tasks = 10
    c.stream.train_subset = 54000
    c.model.hidden = (100, 100)
    c.model.use_bias = False
    c.train.optimizer = "sgd"
    c.train.lr = 0.01
    c.train.epochs = 5
    c.train.batch_size = 10
    c.gpm.threshold = (0.95, 0.99, 0.99)
    c.gpm.num_samples = 300
    return c
